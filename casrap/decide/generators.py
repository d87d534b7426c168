"""One generation contract: a plan's kind picks its generator, and says up front what it cannot do.

Every generator takes the same arguments (``model, tokenizer, input_ids, max_new_tokens``,
``clock``, ``on_text``, ``ignore_eos`` and :func:`casrap.decide.generation.prepare_request`'s
request options: cancel and its deadline, ``on_step`` streaming, ``on_decode_step``, stop
strings, seed and sampling, penalties, ``logit_bias``, logprobs) and returns the same
:class:`~casrap.decide.generation.GenerationOutput`, timed by the same per-token clock;
every one ends on all the end ids of the model's generation config.

- ``dense``: :func:`~casrap.decide.generation.generate_timed` (``model.generate``);
- ``kv``: :func:`~casrap.decide.kv_generation.generate_timed_kv` (the prompt's KV cache
  compressed after prefill, ``kv-R`` plans);
- ``pld``: transformers' prompt-lookup decoding on the full model (``pld-K`` plans): drafts
  of up to K tokens copied from the prompt, verified in one forward pass, so its greedy
  answer is the dense one. A pass may add several tokens; the per-step hook and
  ``decode_steps_s`` see one entry per forward pass. It cannot return logprobs (a pass
  keeps only its last distribution), so it *refuses* them.

What a generator refuses is known before anything runs (:meth:`Generator.unsupported`):
the Router masks such actions for a request that asks for a refused option
(:meth:`casrap.decide.router.Router.allowed`), so a request never fails after the policy
chose, mid-stream, after its response started. Adding a kind is one entry in
:func:`generator_for`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from casrap.decide.generation import GenerationOutput, generate_timed
from casrap.decide.kv_generation import generate_timed_kv, kv_keep_of
from casrap.errors import InputError
from casrap.profiles.catalogue import PLD_META

DENSE, COMPRESSED_KV, PROMPT_LOOKUP = "dense", "kv", "pld"

# request options and the value that means "not asked for"
OPTION_DEFAULTS: dict[str, Any] = {
    "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": None,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "logprobs": None, "cancel": None,
    "on_step": None, "on_decode_step": None, "generate_options": None,
}


def requested(options: Mapping[str, Any]) -> set[str]:
    """The options a request actually asks for (set to something other than their default or empty)."""
    asked = set()
    for key, value in options.items():
        default = OPTION_DEFAULTS.get(key)
        if value is None or value is False or (isinstance(value, (list, tuple, dict, str)) and not value):
            continue
        if key in OPTION_DEFAULTS and value == default:
            continue
        asked.add(key)
    return asked


def prompt_lookup_of(plan: Any) -> int | None:
    """The draft length a ``pld-K`` plan asks for, or None."""
    value = (getattr(plan, "meta", None) or {}).get(PLD_META)
    return int(value) if value else None


@dataclass(frozen=True)
class Generator:
    """A generator for one kind of plan: what it refuses, and how it runs."""

    kind: str
    run: Callable[..., GenerationOutput]
    refuses: frozenset[str] = field(default_factory=frozenset)

    def unsupported(self, options: Mapping[str, Any]) -> list[str]:
        """The asked-for options this generator cannot honour (sorted; empty when it honours all)."""
        return sorted(requested(options) & self.refuses)

    def __call__(self, model: Any, tokenizer: Any, input_ids: Any, max_new_tokens: int, **kwargs: Any) -> GenerationOutput:
        refused = self.unsupported(kwargs)
        if refused:
            raise InputError(f"{self.kind} generation does not support {', '.join(refused)}")
        return self.run(model, tokenizer, input_ids, max_new_tokens, **kwargs)


def generator_for(plan: Any) -> Generator:
    """The generator a plan's kind runs with (``dense`` unless the plan asks for another)."""
    keep = kv_keep_of(plan)
    if keep is not None:
        # its own decode loop: ``model.generate`` options (a static cache, compiled decoding) do not apply
        return Generator(COMPRESSED_KV, partial(generate_timed_kv, keep_ratio=keep), frozenset({"generate_options"}))
    lookup = prompt_lookup_of(plan)
    if lookup is not None:
        return Generator(PROMPT_LOOKUP, partial(generate_timed, prompt_lookup=lookup), frozenset({"logprobs", "generate_options"}))
    return Generator(DENSE, generate_timed)
