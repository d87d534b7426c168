"""Score profiles on lm-evaluation-harness tasks, offline included.

The live model object is passed to ``HFLM(pretrained=model, tokenizer=tok)``, so each
profile is evaluated by switching the bank, not by reloading. ``casrap_local`` is a
20-question multiple-choice task written for the project and shipped with it; its
YAML is written at run time with an absolute path to the bundled JSONL (lm-eval's
``dataset_path: json`` needs one). Hub tasks (hellaswag, ...) work where reachable.
"""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from casrap.errors import CasrapError, InputError

LOCAL_TASK = "casrap_local"

_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def multiple_choice_yaml(name: str, data: Path) -> str:
    """An lm-eval task YAML for a JSONL of ``{question, choices, answer}`` records (absolute path)."""
    return _YAML.format(name=name, data=Path(data).resolve())


def write_local_task(directory: Path) -> Path:
    data = Path(str(resources.files("casrap.data").joinpath("casrap_local.jsonl")))
    path = directory / f"{LOCAL_TASK}.yaml"
    path.write_text(multiple_choice_yaml(LOCAL_TASK, data))
    return path


def run_lm_eval(
    bank: Any,
    tokenizer: Any,
    tasks: list[str],
    profiles: list[str],
    limit: int | None = None,
    include_paths: list[Path] | None = None,
) -> dict[str, dict[str, float]]:
    """Accuracy per task for the full model and each profile: {profile: {task: acc}}.

    ``include_paths`` are folders of the user's own lm-eval task YAMLs (lm-eval's
    ``include_path``), searched besides the bundled ``casrap_local``.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise CasrapError("--lm-eval needs lm-evaluation-harness: pip install 'casrap[eval]'") from err
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise InputError("--lm-eval: no task named")
    results: dict[str, dict[str, float]] = {}
    extra = [Path(p).expanduser().resolve() for p in include_paths or []]
    missing = [str(p) for p in extra if not p.is_dir()]
    if missing:
        raise InputError(f"--lm-eval-include: not a folder: {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        write_local_task(Path(tmp))
        manager = TaskManager(include_path=[tmp, *map(str, extra)])
        for name in ["none", *[p for p in profiles if p != "none"]]:
            with bank.using(name):
                lm = HFLM(pretrained=bank.model, tokenizer=tokenizer, batch_size=1)
                try:
                    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
                except Exception as err:  # noqa: BLE001 - hub tasks fail offline
                    raise CasrapError(f"lm-eval failed on {tasks} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); offline, use --lm-eval {LOCAL_TASK}") from err
            results[name] = {
                task: float(next((v for k, v in metrics.items() if k.startswith("acc,")), float("nan")))
                for task, metrics in out["results"].items()
            }
    return results
