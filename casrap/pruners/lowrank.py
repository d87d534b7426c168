"""LLM-Sieve-style low-rank projections: closed-form PCA of each linear map's outputs.

For a linear map ``y = W x (+ b)`` the outputs it produces on calibration text span
far fewer directions than its width. With ``U`` the top-``r`` principal directions of
those outputs (eigenvectors of the uncentred second moment ``E[y yᵀ]``), ``U Uᵀ y`` is
the best rank-``r`` approximation of ``y`` on that text, and it factorises as two
smaller linears: ``reduce`` (``Uᵀ W``, ``r x d_in``, bias ``Uᵀ b``) then ``expand``
(``U``, ``d_out x r``), ``r (d_in + d_out)`` parameters instead of ``d_in d_out``.
This closed form fitted better than gradient-trained adapters or a plain weight SVD
(relative error 0.48/0.41 vs 0.58/0.54 and 0.62, see DESIGN.md), and needs no training.

Why a cached *basis* rather than cached factors: the factors depend on the rank, and
ranks differ per profile and per search genome; the principal directions do not. So
the first use fits, for every q/k/v/o/gate/up/down projection, its eigenvectors (up to
the break-even rank, stored float16: ~115 MB for SmolLM2) and the output energy along
each direction, on :func:`casrap.data.calibration.calibration_texts` only (~2-3 min for
SmolLM2 on 2 busy cores), and saves them under
``CASRAP_HOME/lowrank`` keyed to :func:`casrap.models.architecture.model_key` (like
the importance cache). Any ``lowrank-P`` spec, rank plan or search genome then builds
in about a second from that file. A matrix whose rank would not reduce parameters
(``r >= d_in d_out / (d_in + d_out)``) stays dense.

Rank allocation for ``lowrank-P`` (:func:`allocate_ranks`): minimise the *sum of
relative residual output energies* of all matrices (the share of each matrix's output
energy on calibration text that the projection drops) under the parameter budget;
each added rank buys ``λ_k / E`` error for ``d_in + d_out`` parameters, so a greedy
pick of the best ratio across all matrices is optimal up to integrality.

The directions come from every token's outputs, but the energies that drive the
allocation leave out each text's first token: its attention-sink outputs are orders of
magnitude larger, made one direction of some matrices look like all their energy, and
the allocation gave those matrices rank 1-2 (lowrank-10 validation ppl 70.5 with them,
53.5 without; full model 28.8).

Why low-rank is opt-in (not in the default action catalogue): on the bundled prose no
low-rank plan measured so far is on the Pareto front of decode speed against test
perplexity (lowrank-25: 1.14x at 6.9x the full model's perplexity, where ffn-25 gives
1.11-1.14x at 1.9x; ``benchmarks/results/lowrank-speed.json``). LLM-Sieve fits its
projections to the task the model will serve; a general-prose basis is the wrong use of
it. Fit on your task text (``casrap search -e ranks --calibration-text FILE``, which also
bisects for the largest cut within a perplexity budget, ``ranks-budget-T``) and measure
before offering a low-rank plan as an action.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from casrap.errors import CheckpointError
from casrap.models.architecture import decoder_layers, model_key
from casrap.paths import casrap_home
from casrap.pruners.importance import forward_over_texts
from casrap.pruners.reorder import inverse, output_order

log = logging.getLogger(__name__)

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MATRICES = ATTENTION + MLP
BASIS_VERSION = 3  # bump when the calibration text, statistic or storage changes
# the importance calibration's 64 texts (16 prose paragraphs + 48 training prompts, ~3.2k
# SmolLM2 tokens). All 369 calibration texts (8.1k tokens, mostly short prompts) fitted the
# calibration text better but held-out prose worse (lowrank-25 validation ppl 247 vs 178)
CALIBRATION_SAMPLES = 64
Ranks = dict[int, dict[str, int]]  # layer -> projection name -> rank
Key = tuple[int, str]


def breakeven_rank(d_in: int, d_out: int) -> int:
    """Largest rank whose factor pair holds strictly fewer parameters than the dense map."""
    return max(0, (d_in * d_out - 1) // (d_in + d_out))


def factor_params(rank: int | None, d_in: int, d_out: int) -> int:
    """Parameters of the map at ``rank`` (None or a non-reducing rank = dense)."""
    if rank is None or rank >= breakeven_rank(d_in, d_out) + 1:
        return d_in * d_out
    return rank * (d_in + d_out)


def rank_for_rate(rate: float, d_in: int, d_out: int) -> int | None:
    """Rank removing about ``rate`` of the map's parameters; None = keep dense."""
    if rate <= 0:
        return None
    rank = int((1.0 - rate) * d_in * d_out // (d_in + d_out))
    return None if rank > breakeven_rank(d_in, d_out) else max(1, rank)


def _parent(name: str) -> str:
    return "self_attn" if name in ATTENTION else "mlp"


def layout_vectors(vectors: torch.Tensor, layer: nn.Module, name: str) -> torch.Tensor:
    """Basis rows (original output order) in the layout of a possibly reordered base layer."""
    order = output_order(layer, name)
    return vectors if order is None else vectors.index_select(0, order.to(vectors.device))


# ------------------------------------------------------------------ the module
class FactorisedLinear(nn.Module):
    """``expand(reduce(x))``: a rank-``r`` stand-in for a Linear, shape-compatible with it.

    Exposes ``in_features`` / ``out_features`` so that shape-reading code (GQA checks,
    ``describe``) treats it as the map it replaces; holds only the two factors.
    """

    def __init__(self, reduce: nn.Linear, expand: nn.Linear) -> None:
        super().__init__()
        self.reduce = reduce
        self.expand = expand

    @property
    def in_features(self) -> int:
        return self.reduce.in_features

    @property
    def out_features(self) -> int:
        return self.expand.out_features

    @property
    def rank(self) -> int:
        return self.reduce.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.reduce(x))


def factorise(linear: nn.Linear, vectors: torch.Tensor, projected: torch.Tensor | None = None) -> FactorisedLinear:
    """Project ``linear``'s outputs on the orthonormal columns of ``vectors`` ([d_out, r]).

    Factors are computed in float32 and stored in the linear's dtype and device; with a
    complete orthonormal basis the result equals ``linear`` (up to rounding).
    ``projected`` (``vectorsᵀ W``, precomputed) skips the matmul when many ranks of the
    same matrix are built (search).
    """
    weight = linear.weight.detach()
    u = vectors.to(device=weight.device, dtype=torch.float32)
    reduce_w = (projected if projected is not None else u.T @ weight.float()).to(weight.dtype).contiguous()
    expand_w = u.to(weight.dtype).contiguous()
    reduce = nn.Linear(weight.shape[1], u.shape[1], bias=linear.bias is not None, device="meta")
    reduce.weight = nn.Parameter(reduce_w, requires_grad=False)
    if linear.bias is not None:
        reduce.bias = nn.Parameter((u.T @ linear.bias.detach().float()).to(weight.dtype), requires_grad=False)
    expand = nn.Linear(u.shape[1], weight.shape[0], bias=False, device="meta")
    expand.weight = nn.Parameter(expand_w, requires_grad=False)
    return FactorisedLinear(reduce, expand)


# ------------------------------------------------------------------- the basis
@dataclass
class MatrixBasis:
    """Principal output directions of one projection, by decreasing energy."""

    vectors: torch.Tensor  # [d_out, r_max] orthonormal columns (r_max = break-even rank)
    energy: torch.Tensor  # [d_out] ordinary tokens' output energy along each vector (sums to their total)
    d_in: int
    projected: torch.Tensor | None = None  # vectorsᵀ W in float32, only while searching (not saved)

    @property
    def d_out(self) -> int:
        return int(self.energy.shape[0])

    def relative_error(self, rank: int | None) -> float:
        """Share of calibration output energy the rank-``rank`` projection drops."""
        if rank is None:
            return 0.0
        total = float(self.energy.sum())
        return float(self.energy[rank:].sum()) / total if total > 0 else 0.0


@dataclass
class LowRankBasis:
    """Per-projection PCA bases of one model (see the module docstring for why)."""

    matrices: dict[Key, MatrixBasis]
    source: str  # "calibrated:N texts, T tokens"
    model_key: str

    @property
    def shapes(self) -> dict[Key, tuple[int, int]]:
        return {k: (m.d_in, m.d_out) for k, m in self.matrices.items()}

    def precompute_projections(self, model: Any) -> None:
        """Keep ``Uᵀ W`` of every projection (float32, ~half the projection weights):
        building a rank then slices rows instead of multiplying. For search only."""
        layers = decoder_layers(model)
        with torch.no_grad():
            for (layer, name), m in self.matrices.items():
                weight = getattr(getattr(layers[layer], _parent(name)), name).weight
                m.projected = layout_vectors(m.vectors, layers[layer], name).to(weight.device, torch.float32).T @ weight.float()

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        d_in: dict[str, int] = {}
        for (layer, name), m in self.matrices.items():
            tensors[f"{layer}.{name}.vectors"] = m.vectors.to(torch.float16).contiguous()
            tensors[f"{layer}.{name}.energy"] = m.energy.float().contiguous()
            d_in[f"{layer}.{name}"] = m.d_in
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"source": self.source, "model_key": self.model_key, "d_in": json.dumps(d_in)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path, expected_key: str | None = None) -> LowRankBasis:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                d_in = json.loads(meta.get("d_in", "{}"))
                matrices = {}
                for key, width in d_in.items():
                    layer, name = key.split(".", 1)
                    matrices[(int(layer), name)] = MatrixBasis(
                        handle.get_tensor(f"{key}.vectors"), handle.get_tensor(f"{key}.energy"), int(width))
        except Exception as err:
            raise CheckpointError(f"low-rank basis file {path} is unreadable: {err}") from err
        if expected_key and meta.get("model_key") != expected_key:
            raise CheckpointError(f"low-rank basis {path} was made for another model ({meta.get('model_key')}); delete it to refit")
        return cls(matrices, meta.get("source", "?"), meta.get("model_key", ""))


CALIBRATION_ENV = "CASRAP_LOWRANK_CALIBRATION"  # a text file: fit (and replay) bases on the user's task text


def task_calibration() -> tuple[list[str], str] | None:
    """The user's task text (``$CASRAP_LOWRANK_CALIBRATION``) as calibration chunks, and its digest.

    Why an environment variable: LLM-Sieve's projections are meant to be fitted on the
    text the model will serve, and a rank plan holds only ranks, so every command that
    rebuilds the plan (search, bench, run, export) must use the same basis; the variable
    reaches them all and the basis file is keyed by the text's digest. ``None`` when unset.
    """
    import hashlib
    import os

    name = os.environ.get(CALIBRATION_ENV, "").strip()
    if not name:
        return None
    path = Path(name).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read the low-rank calibration text {path}: {err}") from err
    chunks = calibration_chunks(text)
    if not chunks:
        raise CheckpointError(f"low-rank calibration text {path} is empty")
    return chunks, hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def calibration_chunks(text: str, words: int = 160) -> list[str]:
    """Paragraphs (blank-line separated) cut into pieces of at most ``words`` words, so a
    long document is not truncated to its first ``max_tokens`` tokens by :func:`fit_basis`."""
    chunks = []
    for paragraph in (p.split() for p in text.split("\n\n")):
        chunks.extend(" ".join(paragraph[i:i + words]) for i in range(0, len(paragraph), words))
    return [c for c in chunks if c]


def default_basis_path(key: str) -> Path:
    """The cached basis: the bundled calibration's, or the task text's when
    ``$CASRAP_LOWRANK_CALIBRATION`` names one (keyed by its digest)."""
    task = task_calibration()
    suffix = f"-task-{task[1]}" if task else ""
    return casrap_home() / "lowrank" / f"{key}-pca{BASIS_VERSION}{suffix}.safetensors"


@torch.inference_mode()
def fit_basis(
    model: Any,
    tokenizer: Any,
    texts: Iterable[str],
    max_tokens: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> LowRankBasis:
    """Accumulate ``yᵀy`` of every projection's outputs over ``texts``; eigendecompose.

    Call it on the full model (no profile active). Memory: one ``d_out²`` float32
    accumulator per projection (~700 MB for SmolLM2) while it runs.
    """
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CheckpointError("low-rank fitting needs at least one non-empty calibration text")
    layers = decoder_layers(model)
    second: dict[Key, torch.Tensor] = {}
    widths: dict[Key, int] = {}
    handles = []

    firsts: dict[Key, list[torch.Tensor]] = {}

    def hook(key: Key) -> Callable[..., None]:
        # on a reordered model (casrap.pruners.reorder) outputs come in layout order: the
        # basis is kept in original order, so that it is the same whichever layout fitted it
        order = output_order(layers[key[0]], key[1])
        inv = inverse(order, order.numel()) if order is not None else None

        def inner(module: Any, args: Any, output: torch.Tensor) -> None:
            y = output.detach().float()
            if inv is not None:
                y = y.index_select(-1, inv.to(y.device))
            firsts[key].append(y[:, 0].cpu())
            rest = y[:, 1:].reshape(-1, y.shape[-1])
            second[key].addmm_(rest.T, rest)
        return inner

    for i, layer in enumerate(layers):
        for name in MATRICES:
            linear = getattr(getattr(layer, _parent(name)), name)
            second[(i, name)] = torch.zeros(linear.out_features, linear.out_features, device=linear.weight.device)
            widths[(i, name)] = linear.in_features
            firsts[(i, name)] = []
            handles.append(linear.register_forward_hook(hook((i, name))))
    tokens = forward_over_texts(model, tokenizer, texts, handles, max_tokens, progress)
    matrices = {}
    for key in list(second):
        rest = second.pop(key).double().cpu()
        first = torch.cat(firsts.pop(key)).double()
        _, vectors = torch.linalg.eigh((rest + first.T @ first) / tokens)
        vectors = vectors.flip(1)
        # what each direction carries for ordinary tokens: the first token's outputs are
        # massive (attention sink) and would otherwise make one direction look like all
        # of a matrix's energy, and the allocation starve the directions text needs
        energy = ((rest @ vectors) * vectors).sum(0).div(tokens).clamp_min(0)
        r_max = max(1, breakeven_rank(widths[key], rest.shape[0]))
        # stored as saved (float16): a plan built right after fitting equals its later replay
        matrices[key] = MatrixBasis(vectors[:, :r_max].to(torch.float16).cpu(), energy.float().cpu(), widths[key])
    return LowRankBasis(matrices, f"calibrated:{len(texts)} texts, {tokens} tokens", model_key(model))


def load_or_fit_basis(
    model: Any,
    tokenizer: Any = None,
    key: str | None = None,
    texts: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LowRankBasis:
    """The cached basis for this model, or one fitted now on calibration text (and cached).

    Without a tokenizer it cannot fit: a one-line error naming the missing file.
    ``key`` saves recomputing the fingerprint (the bank knows it).
    """
    key = key or model_key(model)
    path = default_basis_path(key)
    if path.is_file():
        return LowRankBasis.load(path, expected_key=key)
    if tokenizer is None:
        raise CheckpointError(f"no low-rank basis for this model at {path}; build a lowrank-P profile once with a tokenizer (e.g. casrap bench -p lowrank-25)")
    from casrap.data.calibration import calibration_texts

    task = task_calibration() if texts is None else None
    log.info("no low-rank basis for this model yet: fitting PCA of every projection's outputs on %s, saving to %s",
             "the task text" if task else "calibration text", path)
    basis = fit_basis(model, tokenizer, texts or (task[0] if task else calibration_texts(CALIBRATION_SAMPLES)), progress=progress)
    if task:
        basis.source = f"{basis.source}, task text {task[1]}"
    basis.save(path)
    return basis


# -------------------------------------------------------------- building layers
def factorise_layer(layer: nn.Module, original: nn.Module, ranks: dict[str, int], basis: LowRankBasis, index: int) -> None:
    """Swap factorised projections into a layer *shell* (never into ``original``).

    ``layer`` must be a shell of ``original`` whose ``self_attn`` is already its own
    shell; its ``mlp`` is shelled here if still shared. Ranks at or above the break-even
    rank leave the projection dense.
    """
    from casrap.pruners.modules import shell

    if any(name in MLP for name in ranks) and layer.mlp is original.mlp:
        layer.mlp = shell(original.mlp)
    for name, rank in ranks.items():
        entry = basis.matrices.get((index, name))
        if entry is None:
            raise CheckpointError(f"low-rank basis has no {name} for layer {index}; it was fitted on another model shape")
        if rank > entry.vectors.shape[1]:
            continue  # would not reduce parameters: stays dense
        source = getattr(getattr(original, _parent(name)), name)
        projected = entry.projected[:rank] if entry.projected is not None else None
        vectors = layout_vectors(entry.vectors[:, :rank], original, name)
        setattr(getattr(layer, _parent(name)), name, factorise(source, vectors, projected))


# ----------------------------------------------------------------- allocations
def linear_params(shapes: dict[Key, tuple[int, int]]) -> int:
    return sum(d_in * d_out for d_in, d_out in shapes.values())


def removed_fraction(ranks: Ranks, shapes: dict[Key, tuple[int, int]]) -> float:
    """Share of the decoder's projection parameters a rank plan removes."""
    total = linear_params(shapes)
    kept = sum(factor_params(ranks.get(layer, {}).get(name), *shape) for (layer, name), shape in shapes.items())
    return 1.0 - kept / total


def _as_ranks(chosen: dict[Key, int | None]) -> Ranks:
    ranks: Ranks = {}
    for (layer, name), rank in sorted(chosen.items()):
        if rank is not None:
            ranks.setdefault(layer, {})[name] = int(rank)
    return ranks


def rates_to_ranks(rates: dict[Key, float], shapes: dict[Key, tuple[int, int]]) -> Ranks:
    """Per-matrix parameter removal rates to ranks (rate 0 or non-reducing = dense)."""
    return _as_ranks({k: rank_for_rate(rates[k], *shapes[k]) for k in shapes})


def ranks_to_rates(ranks: Ranks, shapes: dict[Key, tuple[int, int]]) -> dict[Key, float]:
    return {k: 1.0 - factor_params(ranks.get(k[0], {}).get(k[1]), *s) / (s[0] * s[1]) for k, s in shapes.items()}


def uniform_ranks(shapes: dict[Key, tuple[int, int]], fraction: float) -> Ranks:
    """Every projection loses the same share ``fraction`` of its parameters (LLM-Sieve's
    uniform baseline; the same rank *relative to each matrix's break-even rank*)."""
    return rates_to_ranks({k: fraction for k in shapes}, shapes)


def allocate_ranks(basis: LowRankBasis, fraction: float, min_rank: int = 1) -> Ranks:
    """Ranks removing ``fraction`` of projection parameters at least total relative error.

    Greedy on (energy gained / parameters spent) over all matrices and ranks, from
    ``min_rank`` everywhere up to the kept-parameter budget; a matrix that reaches its
    break-even rank is kept dense; then the worst-value ranks are dropped until the
    budget holds.
    """
    shapes = basis.shapes
    budget = (1.0 - fraction) * linear_params(shapes)
    keys = sorted(basis.matrices)
    chosen: dict[Key, int] = {}
    gains, owners = [], []
    for idx, key in enumerate(keys):
        m = basis.matrices[key]
        r_max = m.vectors.shape[1]
        total = float(m.energy.sum()) or 1.0
        start = min(min_rank, r_max)
        chosen[key] = start
        cost = m.d_in + m.d_out
        gains.append(m.energy[start:r_max].double() / total / cost)
        owners.append(torch.full((r_max - start,), idx, dtype=torch.long))
    spent = sum(chosen[k] * (basis.matrices[k].d_in + basis.matrices[k].d_out) for k in keys)
    order = torch.cat(gains).argsort(descending=True, stable=True)
    owner_of = torch.cat(owners)[order].tolist()
    for idx in owner_of:
        key = keys[idx]
        cost = basis.matrices[key].d_in + basis.matrices[key].d_out
        if spent + cost > budget:
            break
        chosen[key] += 1
        spent += cost
    result: dict[Key, int | None] = {k: (None if chosen[k] >= basis.matrices[k].vectors.shape[1] else chosen[k]) for k in keys}
    # going dense costs a little more than the break-even rank: give back the cheapest ranks
    while sum(factor_params(r, *shapes[k]) for k, r in result.items()) > budget:
        candidates = [k for k, r in result.items() if r is not None and r > min_rank]
        if not candidates:
            break
        worst = min(candidates, key=lambda k: float(basis.matrices[k].energy[result[k] - 1]) / float(basis.matrices[k].energy.sum() or 1)
                    / (shapes[k][0] + shapes[k][1]))
        result[worst] -= 1  # type: ignore[operator]
    return _as_ranks(result)


def ranks_within_error(basis: LowRankBasis, max_error: float) -> Ranks:
    """Per matrix, the smallest rank whose dropped share of calibration output energy is
    at most ``max_error`` (dense where that rank would not save parameters).

    LLM-Sieve's per-matrix search: each projection keeps what its own outputs need,
    rather than every projection giving up the same share; the search over
    ``max_error`` (:func:`casrap.search.ranks.run_ranks`) then meets a perplexity budget.
    """
    chosen: dict[Key, int | None] = {}
    for key, m in basis.matrices.items():
        total = float(m.energy.sum())
        r_max = m.vectors.shape[1]
        if total <= 0:
            chosen[key] = 1
            continue
        kept = m.energy.double().cumsum(0) / total  # kept[r - 1]: share kept at rank r
        rank = int((kept < 1.0 - max_error).sum()) + 1
        chosen[key] = None if rank >= r_max else max(1, rank)
    return _as_ranks(chosen)


def total_relative_error(basis: LowRankBasis, ranks: Ranks) -> float:
    """Sum over matrices of the share of output energy dropped (the allocation's objective)."""
    return sum(m.relative_error(ranks.get(k[0], {}).get(k[1])) for k, m in basis.matrices.items())
