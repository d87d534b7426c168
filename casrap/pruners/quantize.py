"""Weight-only int4 projections on CPU: the ``int4`` profile modifier (``int4``, ``layers-25+int4``).

Every decoder-layer projection (q, k, v, o, gate, up, down) of a profile becomes an
:class:`Int4Linear`: weights in groups of 32 input channels, asymmetric (4-bit codes
``q`` in 0..15 with a float scale and zero per group, dequantised as
``(q - 8) * scale + zero``), packed by ``aten._convert_weight_to_int4pack_for_cpu`` and
multiplied by ``aten._weight_int4pack_mm_for_cpu``. The embeddings, the (tied) LM head
and the norms stay in the model's dtype. These are the aten ops torchao's CPU int4
weight-only tensor (``Int4OpaqueTensor``, a prototype) calls itself; using them directly
adds no dependency and no tensor-subclass dispatch per call. The group parameters follow
torchao's "tinygemm" choice (min/max per group, float zero point).

Whether that is *faster* than float32 ``F.linear`` depends on the CPU: with bfloat16
activations the kernel beat fp32 1.63x on a Xeon with AVX-512-BF16/AMX, and ran at about
half fp32's speed on an AVX2-only EPYC; with fp32 activations it was slower on both. So a
bank asks :func:`quant_kernel_check` (a ~100 ms micro-benchmark at the model's projection
shapes, cached per process) before building an int4 profile, runs activations in whichever
dtype it found faster, and refuses the kind with one line when neither beats fp32
(``CASRAP_ALLOW_SLOW_QUANT=1`` builds anyway, for quality measurements). On CUDA the kind
is refused for now (bitsandbytes 4-bit or torchao's int4 weight-only config would fit).

There is no ``int8`` kind: weight-only int8 per channel (``aten._weight_int8pack_mm``) ran
0.60x fp32, and dynamic int8 (``torch.ao``) ran 1.5-1.7x but at KL 1.4 to the full model.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from casrap.pruners.modules import shell

log = logging.getLogger(__name__)

INT4 = "int4"
QUANT_KINDS = (INT4,)
GROUP_SIZE = 32
N_MULTIPLE = 16  # the CPU packing needs out_features divisible by 16
PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
MIN_SPEEDUP = 1.1  # the packed matmul must beat fp32 F.linear by this much at decode size
ALLOW_SLOW_ENV = "CASRAP_ALLOW_SLOW_QUANT"
ACT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def allow_slow_default() -> bool:
    """``CASRAP_ALLOW_SLOW_QUANT=1``: build int4 profiles even where the kernel check says slow."""
    return os.environ.get(ALLOW_SLOW_ENV, "0").strip().lower() in {"1", "true", "yes"}


# ------------------------------------------------------------------ quantisation
def quantize_groups(weight: torch.Tensor, group: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int32 [N, K], scale [N, K/group], zero [N, K/group]) of an fp weight, asymmetric.

    Per group of ``group`` input channels: ``scale = (max - min) / 15`` (at least 1e-6),
    ``zero = min + 8 * scale``, ``q = round((w - min) / scale)`` clamped to 0..15, so that
    ``(q - 8) * scale + zero`` reproduces the weight (exactly for weights that already sit on
    a 16-level grid per group, as GGUF Q4_1 weights do). ``K`` must be a multiple of ``group``.
    """
    rows, cols = weight.shape
    if cols % group:
        raise ValueError(f"in_features {cols} is not a multiple of the group size {group}")
    w = weight.detach().float().reshape(rows, cols // group, group)
    low = w.amin(dim=-1, keepdim=True)
    high = w.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-6)
    codes = ((w - low) / scale).round().clamp(0, 15).to(torch.int32)
    zero = low + 8 * scale
    return codes.reshape(rows, cols), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int = GROUP_SIZE) -> torch.Tensor:
    """The float32 weight the kernel multiplies by: ``(q - 8) * scale + zero`` per group."""
    rows, cols = codes.shape
    grouped = codes.float().reshape(rows, cols // group, group)
    return ((grouped - 8) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).reshape(rows, cols)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def effective_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias or None) of any linear map a profile holds, in float32.

    A plain ``nn.Linear`` gives its own; anything else (a grouped-rows view, an unmerged
    LoRA projection) is probed with the identity, so what gets quantised is exactly the map
    the profile ran: a healing adapter is folded in before packing.
    """
    if type(module) is nn.Linear:
        return module.weight.detach().float(), (module.bias.detach().float() if module.bias is not None else None)
    first = next(iter(module.parameters()), None)
    if first is None:
        first = next(iter(module.buffers()))
    dtype, device = first.dtype, first.device
    width = int(module.in_features)
    with torch.no_grad():
        bias = module(torch.zeros(1, width, dtype=dtype, device=device)).float()[0]
        weight = (module(torch.eye(width, dtype=dtype, device=device)).float() - bias).t().contiguous()
    return weight, (bias if bool(bias.abs().max() > 0) else None)


class Int4Linear(nn.Module):
    """``y = x W^T (+ b)`` with ``W`` packed to int4 (groups of 32, asymmetric) for the CPU kernel.

    Activations are cast to ``act_dtype`` for the matmul and the result back to the
    input's dtype, so the rest of the model runs as before. Shapes the packing cannot take
    are padded: out_features up to a multiple of 16 (extra rows cut from the output),
    in_features up to a multiple of 32 (the weight's last column repeated, so the group's
    range is unchanged, and the input padded with zeros).
    """

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, group: int = GROUP_SIZE, in_order: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group = group
        self.padded_in = int(scales_and_zeros.shape[0]) * group
        self.padded_out = int(packed.shape[0])
        self.act_dtype = scales_and_zeros.dtype
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", bias)
        self.register_buffer("in_order", in_order)  # input columns in packing order (None: as given)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, act_dtype: torch.dtype = torch.bfloat16,
                    group: int = GROUP_SIZE, in_order: torch.Tensor | None = None) -> Int4Linear:
        """Quantise and pack a float weight [out, in]; the scales take ``act_dtype`` (the kernel's rule).

        ``in_order``: pack the input columns in this order (and gather the input the same way
        at run time) — the checkpoint's own channel order on a reordered base, so groups of 32
        fall where the checkpoint's quantisation grid put them.
        """
        out_features, in_features = weight.shape
        w = weight.detach().float()
        if in_order is not None:
            w = w[:, in_order]
        padded_in, padded_out = _round_up(in_features, group), _round_up(out_features, N_MULTIPLE)
        if padded_in != in_features:
            w = torch.cat([w, w[:, -1:].expand(out_features, padded_in - in_features)], dim=1)
        if padded_out != out_features:
            w = torch.cat([w, w.new_zeros(padded_out - out_features, padded_in)], dim=0)
        codes, scale, zero = quantize_groups(w, group)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(act_dtype)
        return cls(packed, scales_and_zeros, in_features, out_features,
                   None if bias is None else bias.detach().float().clone(), group, in_order)

    @classmethod
    def from_module(cls, module: nn.Module, act_dtype: torch.dtype = torch.bfloat16, group: int = GROUP_SIZE,
                    in_order: torch.Tensor | None = None) -> Int4Linear:
        weight, bias = effective_weight(module)
        return cls.from_weight(weight, bias, act_dtype, group, in_order)

    @property
    def logical_numel(self) -> int:
        """Parameters of the float map this module stands for (for parameter counts)."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.packed, self.scales_and_zeros, self.bias, self.in_order)
                   if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        if self.in_order is not None:
            h = h.index_select(-1, self.in_order)
        if self.padded_in != self.in_features:
            h = F.pad(h, (0, self.padded_in - self.in_features))
        h = h.to(self.act_dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(h, self.packed, self.group, self.scales_and_zeros)
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [out, in] the kernel effectively multiplies by (read back through
        the kernel itself; rounded to ``act_dtype`` when that is bfloat16)."""
        eye = torch.eye(self.padded_in, dtype=self.act_dtype, device=self.packed.device)
        full = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_and_zeros)
        weight = full.float()[: self.in_features, : self.out_features].t().contiguous()
        if self.in_order is not None:  # back to the module's own column order
            weight = weight[:, torch.argsort(self.in_order)]
        return weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
                f"act_dtype={str(self.act_dtype).replace('torch.', '')}, bias={self.bias is not None}")


def _cache_key(module: nn.Module, act_dtype: torch.dtype, layout: Any) -> tuple | None:
    """Identity of a plain Linear's weight view (storage, offset, shape, stride), or None.

    Two profiles holding the same base projection (``int4`` and ``layers-25+int4``, or a
    head plan that keeps a layer's k/v modules) then share one packed copy. ``layout``
    separates weights read before and after the base model's zero-copy reorder.
    """
    if type(module) is not nn.Linear or module.bias is not None:
        return None
    w = module.weight
    return (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()), w.dtype, act_dtype, layout)


def checkpoint_order(mlp: nn.Module, down: nn.Module) -> torch.Tensor | None:
    """Input columns of ``down`` sorted back into the checkpoint's channel order (None: already in it).

    A zero-copy reorder (:mod:`casrap.pruners.reorder`) lays FFN channels out by importance
    and keeps, on the MLP, the original channel at each position; a profile's sliced FFN
    keeps a prefix of that order. Packing in the original order keeps each group of 32 on
    the grid the checkpoint was quantised on (a GGUF-dequantised model is then lossless).
    """
    from casrap.pruners.reorder import ffn_order

    order = ffn_order(mlp)
    width = int(getattr(down, "in_features", 0) or 0)
    if order is None or width == 0 or order.numel() < width:
        return None
    sort = torch.argsort(order[:width])
    return None if torch.equal(sort, torch.arange(width)) else sort


def quantize_layers(layers: Sequence[nn.Module], act_dtype: torch.dtype, cache: dict | None = None, layout: Any = None) -> int:
    """Replace every decoder projection of a profile's layer *shells* by an :class:`Int4Linear`.

    The attention and MLP parents are re-shelled first, so a module still shared with the
    base model (or another profile) is never modified. ``cache`` maps a base projection to
    its packed module, so packing happens once per bank. Returns the projections packed now.
    """
    packed_now = 0
    for layer in layers:
        for group, names in PROJECTIONS:
            parent = shell(getattr(layer, group))
            for name in names:
                module = getattr(parent, name)
                if isinstance(module, Int4Linear):
                    continue
                key = _cache_key(module, act_dtype, layout)
                packed = cache.get(key) if cache is not None and key is not None else None
                if packed is None:
                    order = checkpoint_order(parent, module) if name == "down_proj" else None
                    packed = Int4Linear.from_module(module, act_dtype, in_order=order)
                    packed_now += 1
                    if cache is not None and key is not None:
                        cache[key] = packed
                setattr(parent, name, packed)
            setattr(layer, group, parent)
    return packed_now


# ------------------------------------------------------------------ the machine check
@dataclass(frozen=True)
class KernelCheck:
    """What the packed matmul gains over float32 ``F.linear`` on this machine.

    Attributes:
        speedups: activation dtype name -> median over rounds of (fp32 time / int4 time) for
            one decoder layer's projections at decode size.
        cpu: the CPU's vector capability as torch sees it (``AVX2``, ``AVX512``) and its bf16 flags.
        threads: torch threads the timing ran with.
        tokens: rows of the timed input (1 = one decode step).
        rounds: timed rounds per variant.
    """

    speedups: dict[str, float]
    cpu: str = ""
    threads: int = 1
    tokens: int = 1
    rounds: int = 0
    shapes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def act_dtype(self) -> str:
        """The activation dtype whose int4 matmul ran fastest."""
        return max(self.speedups, key=lambda k: self.speedups[k])

    @property
    def best(self) -> float:
        return self.speedups[self.act_dtype]

    def refusal(self, min_speedup: float = MIN_SPEEDUP) -> str | None:
        """The one-line reason to refuse int4 profiles here, or None when the kernel is fast."""
        if self.best >= min_speedup:
            return None
        return (f"int4 weight-only matmul runs {self.best:.2f}x fp32 on this CPU ({self.cpu}; best with "
                f"{self.act_dtype} activations): refusing int4 profiles; set {ALLOW_SLOW_ENV}=1 to build anyway")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["act_dtype"] = self.act_dtype
        return data


_CHECKS: dict[tuple, KernelCheck] = {}
_OVERRIDE: list[KernelCheck] = []


@contextmanager
def kernel_check_result(check: KernelCheck) -> Iterator[KernelCheck]:
    """Make :func:`quant_kernel_check` return ``check`` (tests; a machine measured elsewhere)."""
    _OVERRIDE.append(check)
    try:
        yield check
    finally:
        _OVERRIDE.remove(check)


def cpu_description() -> str:
    """``AVX2, no AVX-512-BF16`` / ``AVX512, AVX-512-BF16, AMX-BF16``: what decides the bf16 path's speed."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            line = next((ln for ln in handle if ln.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    except OSError:
        pass
    parts = [torch.backends.cpu.get_cpu_capability()]
    parts.append("AVX-512-BF16" if "avx512_bf16" in flags else "no AVX-512-BF16")
    if "amx_bf16" in flags:
        parts.append("AMX-BF16")
    return ", ".join(parts)


def kernel_blocker(device: torch.device | str) -> str | None:
    """Why int4 profiles cannot be built on this device at all (one line), or None."""
    device = torch.device(device)
    if device.type != "cpu":
        return (f"int4 profiles run on CPU only for now (the model is on {device.type}); on GPUs bitsandbytes 4-bit "
                "layers or torchao's int4 weight-only config would fit")
    try:
        torch.ops.aten._weight_int4pack_mm_for_cpu  # noqa: B018 - presence check
        torch.ops.aten._convert_weight_to_int4pack_for_cpu  # noqa: B018
    except (AttributeError, RuntimeError):
        return f"this torch ({torch.__version__}) has no CPU int4 weight-only kernel (aten._weight_int4pack_mm_for_cpu)"
    return None


def layer_shapes(layer: nn.Module) -> list[tuple[int, int]]:
    """(out_features, in_features) of a decoder layer's seven projections."""
    return [(int(getattr(getattr(layer, g), n).out_features), int(getattr(getattr(layer, g), n).in_features))
            for g, names in PROJECTIONS for n in names]


@torch.inference_mode()
def quant_kernel_check(shapes: Sequence[tuple[int, int]], budget_s: float = 0.1, tokens: int = 1) -> KernelCheck:
    """Time one decoder layer's projections (``shapes``, random weights) as fp32 ``nn.Linear``
    and as :class:`Int4Linear` with bf16 and with fp32 activations, interleaved per round,
    until ``budget_s`` is spent (at least 3 rounds). Cached per process by shapes, threads, tokens.
    """
    if _OVERRIDE:
        return _OVERRIDE[-1]
    threads = torch.get_num_threads()
    key = (tuple(shapes), threads, tokens)
    if key in _CHECKS:
        return _CHECKS[key]
    gen = torch.Generator().manual_seed(0)
    dense = [nn.Linear(k, n, bias=False) for n, k in shapes]
    for linear in dense:
        linear.weight.data = torch.randn(linear.weight.shape, generator=gen) * 0.02
    variants = {"float32 dense": dense}
    for name, dtype in ACT_DTYPES.items():
        variants[name] = [Int4Linear.from_weight(m.weight, act_dtype=dtype) for m in dense]
    inputs = [torch.randn(tokens, k, generator=gen) for _, k in shapes]

    def run(modules: list[nn.Module]) -> float:
        start = time.perf_counter()
        for module, x in zip(modules, inputs):
            module(x)
        return time.perf_counter() - start

    for modules in variants.values():
        run(modules)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 3 or (time.perf_counter() < deadline and rounds < 200):
        order = list(variants) if rounds % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(run(variants[name]))
        rounds += 1
    base = times.pop("float32 dense")
    speedups = {name: statistics.median(b / t for b, t in zip(base, ts)) for name, ts in times.items()}
    check = KernelCheck(speedups=speedups, cpu=cpu_description(), threads=threads, tokens=tokens, rounds=rounds,
                        shapes=[tuple(s) for s in shapes])
    log.info("int4 kernel check: %s", check.to_dict())
    _CHECKS[key] = check
    return check


def packed_modules(layers: nn.Module) -> list[Int4Linear]:
    return [m for m in layers.modules() if isinstance(m, Int4Linear)]


def require_kernel(layers: Sequence[nn.Module], profile: str, allow_slow: bool = False) -> KernelCheck:
    """The kernel check a bank runs before its first int4 profile; raises one line where int4
    cannot or should not be built here (GPU, no kernel, a kernel slower than fp32 unless
    ``allow_slow``). Timed at the model's own projection shapes."""
    from casrap.errors import UnsupportedModelError

    first = next(iter(layers[0].parameters()))
    blocker = kernel_blocker(first.device)
    if blocker is None and first.dtype not in (torch.float32, torch.bfloat16):
        blocker = f"int4 profiles need a float32 or bfloat16 model, not {str(first.dtype).replace('torch.', '')}"
    if blocker:
        raise UnsupportedModelError(f"profile {profile!r}: {blocker}")
    check = quant_kernel_check(layer_shapes(layers[0]))
    reason = check.refusal()
    if reason and not allow_slow:
        raise UnsupportedModelError(reason)
    if reason:
        log.warning("building %s although %s", profile, reason)
    return check


def drop_unused(cache: dict, layer_lists: Sequence[nn.Module]) -> None:
    """Forget packed modules no profile holds any more (after a profile is removed)."""
    held = {id(m) for layers in layer_lists for m in packed_modules(layers)}
    for key in [k for k, m in cache.items() if id(m) not in held]:
        del cache[key]
