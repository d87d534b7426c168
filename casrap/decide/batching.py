"""Step-level continuous batching on the active profile: sequences join and leave between decode steps.

Why casrap's own and not transformers' continuous batching: ``generate_batch`` /
``ContinuousBatchingManager`` size their paged KV cache from the config (one
``num_key_value_heads`` and ``head_dim`` for every layer, ``num_hidden_layers`` pages
per block), switch the model's attention implementation to a paged one for the whole
model, and run their own generation loop in their own thread with their own logits
processors. A bank's profiles slice kv heads per layer, skip layers and slice FFNs,
and casrap's requests need stop strings with hold-back, raw-distribution logprobs,
per-request seeds and a cancel flag checked after every token. So this module batches
over transformers' standard :class:`~transformers.DynamicCache`, which stores each
layer's keys and values at whatever width that layer has.

The scheme is the simplest correct one:

- a newcomer is prefilled alone (its first token, and so its TTFT, does not wait for
  anyone's padding), then its cache is merged into the running batch along the batch
  dimension; the shorter side is left-padded with masked, all-zero KV slots;
- every decode step feeds each row's last token at its own position id (its count of
  real tokens) with a 2-D attention mask over the cache, so padding never shifts
  positions or gets attended to;
- a row that finishes (end id, max tokens, stop string, cancel) leaves the batch
  before the next step; KV columns that no remaining row uses are trimmed.

Per-request behaviour is :mod:`casrap.decide.generation`'s, built by its
``prepare_request`` and finished by its ``finish_request`` like every other generator:
the same logits processors (penalties, ``logit_bias``, warpers, the per-request seeded
sampler, the logprob recorder) and the same step watch (stop strings with hold-back,
streaming, cancel, per-token clock), applied to each row's own token history. So a greedy row
gives the tokens it would give alone (up to ~1e-6 of fp32 noise that padding adds to
attention sums), and its :class:`~casrap.decide.generation.GenerationOutput` carries
the same timing fields (``ttft_s`` from the start of its prefill, ``decode_steps_s``
between its consecutive tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from casrap.decide.generation import GenerationOutput, finish_request, prepare_request
from casrap.decide.kv_generation import _cache_keyword
from casrap.errors import InputError

BATCH_MODES = ("group", "batch")


@dataclass
class BatchConfig:
    """How concurrent requests share forward passes.

    Attributes:
        max_batch: most sequences decoded together; 1 runs requests one at a time
            (the serial path, no batching engine).
        batch_mode: how the per-request policy meets one running profile.
            ``"group"``: each request is decided on its own; it joins the running batch
            when its profile is the batch's, otherwise it waits until the batch drains.
            ``"batch"``: the policy decides once, for the request that starts a batch
            (its observation counts everyone waiting); requests that arrive while it
            runs join it on that profile without a decision of their own.
    """

    max_batch: int = 8
    batch_mode: str = "group"

    def __post_init__(self) -> None:
        if int(self.max_batch) < 1:
            raise InputError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.batch_mode not in BATCH_MODES:
            raise InputError(f"batch_mode must be one of {', '.join(BATCH_MODES)}, got {self.batch_mode!r}")


@dataclass
class SequenceRequest:
    """One sequence to generate: prompt ids, token limit, and the request options of
    :func:`casrap.decide.generation.prepare_request` (sampling, seed, stop, penalties,
    ``logit_bias``, ``logprobs``, ``cancel``, ``on_step``)."""

    input_ids: torch.Tensor  # [1, prompt tokens]
    max_new_tokens: int
    ignore_eos: bool = False
    options: dict[str, Any] = field(default_factory=dict)


class BatchRow:
    """One row of the batch: its request's processors and step watch, token history and clock readings."""

    def __init__(self, request: SequenceRequest, model: Any, tokenizer: Any, clock: Callable[[], float], tag: Any = None) -> None:
        self.request, self.tokenizer, self.tag = request, tokenizer, tag
        self.decode = prepare_request(model, tokenizer, request.input_ids, clock=clock, ignore_eos=request.ignore_eos,
                                      **request.options)
        self.ids = self.decode.ids
        self.prompt_len = self.decode.prompt_len
        self.ends = set(self.decode.ends)
        self.new: list[int] = []
        self.position = self.prompt_len  # position id of the next token fed (real tokens in the cache)
        self.done = False
        self.start = self.end = 0.0
        self.peak_batch = 1  # the most rows it ever shared a step with

    def choose(self, logits: torch.Tensor) -> int:
        """Pick the next token from this row's [1, vocab] logits, as ``model.generate`` would; note whether it is done."""
        token = int(self.decode.next_token(self.ids, logits)[0, 0])
        self.ids = torch.cat([self.ids, self.ids.new_tensor([[token]])], dim=1)
        self.new.append(token)
        stopped = bool(self.decode.watch(self.ids, None)[0])
        self.done = stopped or token in self.ends or len(self.new) >= self.request.max_new_tokens
        return token

    def output(self) -> GenerationOutput:
        """The row's result, finished exactly as ``generate_timed`` finishes one."""
        return finish_request(self.decode, self.tokenizer, list(self.new), self.start, self.end)


def _layers(cache: Any) -> list[Any]:
    """The cache's per-layer stores (``.keys`` / ``.values``, [batch, kv heads, length, head_dim])."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError("this transformers version's DynamicCache has no .layers: batching needs transformers >= 4.56")
    return list(layers)


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """``width`` zero slots in front of dim -2 (the sequence dim of a KV tensor)."""
    if width <= 0:
        return x
    shape = list(x.shape)
    shape[-2] = width
    return torch.cat([x.new_zeros(shape), x], dim=-2)


class DecodeBatch:
    """The running batch on the bank's active profile (one profile for the batch's whole life).

    Not thread-safe: one scheduler thread admits, steps and drops. ``admit`` prefills a
    newcomer alone and returns after its first token; ``step`` runs one decode forward
    for every row and returns the rows that finished (already removed).
    """

    def __init__(self, model: Any, tokenizer: Any, clock: Callable[[], float] = time.perf_counter) -> None:
        self.model, self.tokenizer, self.clock = model, tokenizer, clock
        self.rows: list[BatchRow] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, cache length], 1 = a real token
        self._cache_kw = _cache_keyword(model)
        self.device = next(model.parameters()).device

    @property
    def size(self) -> int:
        return len(self.rows)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: cache})
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def admit(self, request: SequenceRequest, tag: Any = None) -> BatchRow:
        """Prefill ``request`` alone, pick its first token, merge its cache into the batch.

        The returned row may already be done (one token asked for, an end id, a stop
        string, a cancel): it is then not merged, and the caller finishes it at once.
        """
        row = BatchRow(request, self.model, self.tokenizer, self.clock, tag)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        row.start = self.clock()
        cache = DynamicCache()
        length = row.prompt_len
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        logits = self._forward(row.ids, torch.ones_like(row.ids), positions, cache)
        row.choose(logits)
        if row.done:
            row.end = self.clock()
            return row
        self._merge(cache, torch.ones((1, length), dtype=torch.long, device=self.device))
        self.rows.append(row)
        for other in self.rows:
            other.peak_batch = max(other.peak_batch, len(self.rows))
        return row

    def _merge(self, cache: Any, mask: torch.Tensor) -> None:
        """Append one prefilled cache to the batch's along the batch dim, left-padding the shorter side."""
        if self.cache is None or not self.rows:
            self.cache, self.mask = cache, mask
            return
        old, new = int(self.mask.shape[1]), int(mask.shape[1])
        width = max(old, new)
        for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width - old), _left_pad(theirs.keys, width - new)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width - old), _left_pad(theirs.values, width - new)], dim=0)
        pad = lambda m, w: torch.cat([m.new_zeros((m.shape[0], w)), m], dim=1) if w > 0 else m  # noqa: E731
        self.mask = torch.cat([pad(self.mask, width - old), pad(mask, width - new)], dim=0)

    def _keep(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (indices), and drop KV columns no kept row uses."""
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, index)
        used = mask.sum(0).nonzero()
        first = int(used[0]) if used.numel() else 0
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[..., first:, :]
            layer.values = layer.values.index_select(0, index)[..., first:, :]
        self.mask = mask[:, first:]
        self.rows = [self.rows[i] for i in keep]

    @torch.inference_mode()
    def step(self) -> list[BatchRow]:
        """One decode forward for every row; returns the rows that finished (removed from the batch)."""
        if not self.rows:
            return []
        last = torch.tensor([[row.new[-1]] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.position] for row in self.rows], device=self.device)
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits = self._forward(last, mask, positions, self.cache)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.mask = mask
        for k, row in enumerate(self.rows):
            row.position += 1
            row.choose(logits[k: k + 1])
        now = self.clock()
        finished = [row for row in self.rows if row.done]
        for row in finished:
            row.end = now
        if finished:
            self._keep([k for k, row in enumerate(self.rows) if not row.done])
        return finished

    def drop_all(self) -> list[BatchRow]:
        """Empty the batch (after an error): returns the rows that were in it."""
        rows, now = self.rows, self.clock()
        for row in rows:
            row.end = row.end or now
        self._keep([])
        return rows


__all__ = ["BATCH_MODES", "BatchConfig", "DecodeBatch", "BatchRow", "SequenceRequest"]
