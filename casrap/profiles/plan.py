"""A pruning plan: plain data naming which units of the base model a profile keeps.

Plans are JSON, replayable on the base model, and independent of any built module.
Indices always refer to the *base* model (original layer numbers, original head and
channel indices), so plans compose and can be compared.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from casrap.errors import CheckpointError

PLAN_FORMAT = "casrap-plan/1"


@dataclass
class PruningPlan:
    """Which units to keep; anything not mentioned is kept whole.

    Attributes:
        name: profile name used as the action label.
        base_model: the model spec the plan applies to.
        description: human summary, including units that rounded to zero.
        heads: layer -> {"kv": kept kv heads, "q": kept query heads} (base indices).
        ffn: layer -> kept FFN channels.
        skip_layers: decoder layers not run at all.
        ranks: layer -> {projection name (q_proj .. down_proj): rank}: LLM-Sieve
            low-rank projections on the PCA basis of the projection's calibration
            outputs (:mod:`casrap.pruners.lowrank`); unnamed projections stay dense,
            and a rank that would not reduce parameters also stays dense.
        functional: mask instead of slice (no shape change, no speedup; for comparison
            and search).
        quant: ``""`` (weights in the model's dtype) or ``"int4"``: after slicing, every
            kept decoder projection is packed to int4 weights (:mod:`casrap.pruners.quantize`).
        meta: free-form provenance (intensity, importance source, search run...).
        fingerprint: :func:`casrap.pruners.importance.model_key` of the base model the
            indices refer to; a bank refuses a plan made for another model.
        source: the file the plan was loaded from or last saved to (not serialised):
            relative references in ``meta`` (a healing adapter) resolve beside it, so a
            plan and its adapter move together.
    """

    name: str
    base_model: str = ""
    description: str = ""
    heads: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    ffn: dict[int, list[int]] = field(default_factory=dict)
    skip_layers: list[int] = field(default_factory=list)
    ranks: dict[int, dict[str, int]] = field(default_factory=dict)
    functional: bool = False
    quant: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    source: Path | None = field(default=None, repr=False, compare=False)

    @property
    def is_identity(self) -> bool:
        """No structural change (an ``int4`` plan on the full model is still identity here)."""
        return not (self.heads or self.ffn or self.skip_layers or self.ranks)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source", None)
        if not self.quant:  # plans without it serialise exactly as before the field existed
            data.pop("quant", None)
        data["format"] = PLAN_FORMAT
        data["heads"] = {str(k): v for k, v in self.heads.items()}
        data["ffn"] = {str(k): v for k, v in self.ffn.items()}
        data["ranks"] = {str(k): v for k, v in self.ranks.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        if data.get("format") != PLAN_FORMAT:
            raise CheckpointError(f"not a casrap plan (format {data.get('format')!r}, expected {PLAN_FORMAT})")
        try:
            return cls(
                name=str(data["name"]),
                base_model=str(data.get("base_model", "")),
                description=str(data.get("description", "")),
                heads={int(k): {"kv": list(map(int, v["kv"])), "q": list(map(int, v["q"]))} for k, v in data.get("heads", {}).items()},
                ffn={int(k): list(map(int, v)) for k, v in data.get("ffn", {}).items()},
                skip_layers=sorted(map(int, data.get("skip_layers", []))),
                ranks={int(k): {str(n): int(r) for n, r in v.items()} for k, v in data.get("ranks", {}).items()},
                functional=bool(data.get("functional", False)),
                quant=str(data.get("quant", "") or ""),
                meta=dict(data.get("meta", {})),
                fingerprint=str(data.get("fingerprint", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"malformed plan: {err}") from err

    def validate(self, layers: int, query_heads: int, kv_heads: int, ffn_width: int) -> None:
        """Raise :class:`CheckpointError` (one line) unless every index fits this model's shape.

        Head plans must keep the grouped layout: every kept kv head keeps the same
        number of its own query heads (query head ``h`` belongs to kv head
        ``h // group``), else ``repeat_kv`` would silently pair heads with the wrong
        keys and values.
        """
        group = query_heads // kv_heads
        where = f"plan {self.name!r}"
        for layer in [*self.heads, *self.ffn, *self.skip_layers, *self.ranks]:
            if not 0 <= layer < layers:
                raise CheckpointError(f"{where}: layer {layer} out of range (model has {layers} layers)")
        for layer, kept in self.heads.items():
            kv, q = kept["kv"], kept["q"]
            if not kv or not q:
                raise CheckpointError(f"{where}: layer {layer} keeps no kv or no query heads; skip the layer instead")
            if len(set(kv)) != len(kv) or len(set(q)) != len(q):
                raise CheckpointError(f"{where}: layer {layer} lists a head twice")
            if any(not 0 <= h < kv_heads for h in kv) or any(not 0 <= h < query_heads for h in q):
                raise CheckpointError(f"{where}: layer {layer} names a head out of range ({kv_heads} kv, {query_heads} query heads)")
            per_kv = {g: sum(1 for h in q if h // group == g) for g in kv}
            orphans = [h for h in q if h // group not in per_kv]
            if orphans or len(set(per_kv.values())) != 1:
                raise CheckpointError(
                    f"{where}: layer {layer} breaks the grouped layout (group size {group}: kv {kv}, q {q}); "
                    "every kept kv head must keep the same number of its own query heads"
                )
        for layer, channels in self.ffn.items():
            if not channels:
                raise CheckpointError(f"{where}: layer {layer} keeps no FFN channel; skip the layer instead")
            if len(set(channels)) != len(channels) or any(not 0 <= c < ffn_width for c in channels):
                raise CheckpointError(f"{where}: layer {layer} FFN channels repeat or fall outside 0..{ffn_width - 1}")
        for layer, ranks in self.ranks.items():
            from casrap.pruners.lowrank import MATRICES

            if layer in self.heads or layer in self.ffn:
                raise CheckpointError(f"{where}: layer {layer} has low-rank projections and sliced heads/FFN; the PCA basis fits the unsliced maps")
            bad = [n for n, r in ranks.items() if n not in MATRICES or r < 1]
            if bad:
                raise CheckpointError(f"{where}: layer {layer} ranks {bad} must name one of {', '.join(MATRICES)} with rank >= 1")
        if len(set(self.skip_layers)) >= layers:
            raise CheckpointError(f"{where}: skips every layer")
        if self.quant:
            from casrap.pruners.quantize import QUANT_KINDS

            if self.quant not in QUANT_KINDS:
                raise CheckpointError(f"{where}: unknown quantisation {self.quant!r} (known: {', '.join(QUANT_KINDS)})")
            if self.functional or self.ranks:
                raise CheckpointError(f"{where}: {self.quant} packs structural head/FFN/layer plans only, not masked or low-rank ones")

    def save(self, path: Path) -> Path:
        """Write the JSON; an absolute adapter path inside the plan's folder is written
        relative to the plan, so the folder can be moved (it resolves beside the plan)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        adapter = str(self.meta.get("adapter") or "")
        if adapter and Path(adapter).is_absolute():
            try:
                data["meta"]["adapter"] = Path(adapter).resolve().relative_to(path.parent.resolve()).as_posix()
            except ValueError:  # elsewhere: kept absolute
                pass
        path.write_text(json.dumps(data, indent=1))
        self.source = path
        return path

    @classmethod
    def load(cls, path: Path) -> PruningPlan:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read plan {path}: {err}") from err
        plan = cls.from_dict(data)
        plan.source = Path(path)
        return plan
