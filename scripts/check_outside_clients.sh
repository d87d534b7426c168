#!/usr/bin/env bash
# Drive `casrap serve` (embedded model) with three outside clients and check that they agree:
#   1. the `openai` package: sync, async, streaming, stop, seed, logprobs, include_usage, tools -> 400
#   2. langchain-openai's ChatOpenAI: invoke, stream, stop
#   3. GuideLLM (`guidellm run`, synchronous, a local CSV of prompts, the embedded model's tokenizer folder),
#      compared with `casrap loadtest --url --concurrency 1` on the same prompts: TTFT and ITL within 10%.
#
# Needs: pip install -e ".[dev,serve]" (openai, langchain-openai) and `pip install guidellm` (not in an
# extra: a CLI with its own web stack). Run it on a quiet machine: it times the server.
#
#   scripts/check_outside_clients.sh [PORT] [REQUESTS] [MAX_TOKENS]
set -euo pipefail

PORT="${1:-8765}"
REQUESTS="${2:-16}"
MAX_TOKENS="${3:-32}"
PY="${PYTHON:-.venv/bin/python}"
GUIDELLM="${GUIDELLM:-$(dirname "$PY")/guidellm}"
WORK="$(mktemp -d -t casrap-clients-XXXX)"
URL="http://127.0.0.1:${PORT}"
MODEL_ID="casrap"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

"$PY" -c "import openai, langchain_openai" || { echo "install the dev extra: pip install -e '.[dev,serve]'"; exit 2; }
[ -x "$GUIDELLM" ] || { echo "GuideLLM not found at $GUIDELLM: pip install guidellm (or set GUIDELLM=...)"; exit 2; }

# prompts (the held-out split) and the embedded model's tokenizer folder, for GuideLLM
"$PY" - "$WORK" "$REQUESTS" <<'EOF'
import csv, sys
from pathlib import Path
from casrap.data.prompts import load_prompts
from casrap.models import load_model
work, n = Path(sys.argv[1]), int(sys.argv[2])
texts = [p.text for p in load_prompts(None, split="test")]
with open(work / "prompts.csv", "w", newline="") as f:
    w = csv.writer(f); w.writerow(["prompt"]); [w.writerow([texts[i % len(texts)]]) for i in range(n)]
load_model("smollm2-135m", device="cpu").tokenizer.save_pretrained(work / "tokenizer")
EOF

"$PY" -m casrap.cli serve --port "$PORT" --model-id "$MODEL_ID" --log-level warning > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 180); do curl -sf "$URL/health" > /dev/null && break; sleep 1; done
curl -sf "$URL/health" > /dev/null || { cat "$WORK/server.log"; exit 1; }

echo "== openai and langchain-openai"
"$PY" - "$URL" "$MODEL_ID" <<'EOF'
import asyncio, sys
import openai
from langchain_openai import ChatOpenAI
url, model = sys.argv[1], sys.argv[2]
msgs = [{"role": "user", "content": "Name three colours."}]
c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
full = c.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0).choices[0].message.content
stop = full.split()[1] if len(full.split()) > 1 else full[2:4]
cut = c.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0, stop=[stop])
assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop", (full, stop, cut)
a = c.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=1, seed=11).choices[0].message.content
b = c.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=1, seed=11).choices[0].message.content
assert a == b, (a, b)
lp = c.chat.completions.create(model=model, messages=msgs, max_tokens=4, logprobs=True, top_logprobs=2)
assert len(lp.choices[0].logprobs.content) == lp.usage.completion_tokens
chunks = list(c.chat.completions.create(model=model, messages=msgs, max_tokens=8, stream=True, stream_options={"include_usage": True}))
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
try:
    c.chat.completions.create(model=model, messages=msgs, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    raise SystemExit("tools was accepted")
except openai.BadRequestError as err:
    assert err.body["param"] == "tools"
async def many():
    ac = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    return await asyncio.gather(*[ac.chat.completions.create(model=model, messages=msgs, max_tokens=8) for _ in range(4)])
assert len(asyncio.run(many())) == 4
lc = ChatOpenAI(model=model, base_url=f"{url}/v1", api_key="unused", max_tokens=24, temperature=0, max_retries=0)
text = lc.invoke("Name three colours.").content
assert "".join(str(x.content) for x in lc.stream("Name three colours.")) == text
word = text.split()[1] if len(text.split()) > 1 else text[2:4]
assert lc.invoke("Name three colours.", stop=[word]).content == text[: text.index(word)]
print("openai: sync, async, stream, stop, seed, logprobs, include_usage, tools->400 ok; ChatOpenAI: invoke, stream, stop ok")
EOF

echo "== GuideLLM vs casrap loadtest (synchronous, $REQUESTS prompts, max_tokens $MAX_TOKENS)"
"$GUIDELLM" run --backend "kind=openai_http,target=$URL,model=$MODEL_ID,max_tokens=$MAX_TOKENS" --profile kind=synchronous \
  --constraint "kind=max_requests,count=$REQUESTS" --data "kind=csv_file,path=$WORK/prompts.csv" \
  --tokenizer "kind=huggingface_auto,model=$WORK/tokenizer" --output "kind=json,path=$WORK/guidellm.json" --disable-progress
"$PY" -m casrap.cli loadtest --url "$URL/v1" --concurrency 1 --prompts "$REQUESTS" --prompts-file "$WORK/prompts.csv" \
  -n "$MAX_TOKENS" --reports "$WORK/reports" --json > "$WORK/casrap.json"
"$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
g = json.loads((work / "guidellm.json").read_text())["benchmarks"][0]["metrics"]
c = json.loads((work / "casrap.json").read_text())["vllm"]
pairs = {"TTFT mean ms": (g["time_to_first_token_ms"]["successful"]["mean"], c["mean_ttft_ms"]),
         "ITL mean ms (GuideLLM ITL = vLLM TPOT)": (g["inter_token_latency_ms"]["successful"]["mean"], c["mean_tpot_ms"])}
bad = False
for name, (theirs, ours) in pairs.items():
    gap = abs(ours - theirs) / theirs
    bad |= gap > 0.10
    print(f"{name}: GuideLLM {theirs:.1f}, casrap loadtest {ours:.1f} ({100 * gap:.1f}% apart)")
print(f"files in {work}")
sys.exit(1 if bad else 0)
EOF
