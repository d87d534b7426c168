"""The policy bundle: everything needed to run a trained policy exactly as it was trained.

A checkpoint that stores profile *names* is not enough: re-running calibration
changes what ``ffn-8`` means, silently. A bundle therefore stores, in one folder:

- ``policy.zip``: the Stable-Baselines3 policy;
- ``plans/NN.json``: the exact :class:`PruningPlan` of every action, in action order;
- ``bundle.json``: the manifest: format, model spec and weight fingerprint, action
  names, the observation spec (features, scales, version), reward settings, the
  calibration the plans were built from, training provenance (replay file, prompt
  keys) and the runtime defaults (latency budget when none is asked for).

- the calibration (importance) file the plans were built from, and the low-rank basis
  where a plan has ranks: the bank is reordered from the bundle's own calibration, so
  every machine loading the bundle runs the same weights, whatever ``$CASRAP_HOME`` holds;
- ``plans/NN.adapter/``: the LoRA adapter of every healed plan, pinned by SHA-256 in
  the plan.

Loading checks all of it and fails with one line (:class:`CheckpointError`) on a
format, observation-spec, action-count or model-fingerprint mismatch, a changed
adapter, or a path that leaves the bundle: a policy must never run on actions or
observations other than those it was trained on.

The policy zip is loaded without unpickling anything
(:func:`casrap.agents.training.load_policy`): every pickled entry SB3 stores (spaces,
schedules, classes) is rebuilt from the zip's plain JSON fields, and the weights come
through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from casrap.profiles.catalogue import FULL
from casrap.decide.observation import OBSERVATION_FEATURES, OBSERVATION_VERSION, PPL_SCALE, RUN_QUEUE_SCALE, TARGET_SCALE, TOKENS_SCALE
from casrap.decide.defaults import RuntimeDefaults
from casrap.errors import CheckpointError
from casrap.profiles.plan import PruningPlan

BUNDLE_FORMAT = "casrap-bundle/1"
MANIFEST = "bundle.json"
POLICY = "policy.zip"
DEFAULT_BUNDLE = "default"
BASIS = "lowrank-basis.safetensors"


def bundle_file(root: Path, name: str, what: str) -> Path:
    """``root / name``, refused in one line when ``name`` is absolute or leaves the bundle."""
    from casrap.profiles.adapter import inside

    if not name or Path(name).is_absolute() or not inside(root / name, root):
        raise CheckpointError(f"bundle {root}: {what} {name!r} lies outside the bundle folder; refusing it")
    return root / name


def observation_spec() -> dict[str, Any]:
    """The observation this code builds; a bundle trained on another one is refused."""
    return {
        "version": OBSERVATION_VERSION,
        "features": list(OBSERVATION_FEATURES),
        "scales": {"prompt_tokens": TOKENS_SCALE, "prompt_ppl": PPL_SCALE, "latency_target": TARGET_SCALE, "run_queue": RUN_QUEUE_SCALE},
    }


@dataclass
class PolicyBundle:
    """A loaded (checked) bundle; build the bank with :meth:`build_bank`."""

    path: Path
    manifest: dict[str, Any]
    plans: list[PruningPlan]
    defaults: RuntimeDefaults = field(default_factory=RuntimeDefaults)

    @property
    def actions(self) -> list[str]:
        return [p.name for p in self.plans]

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["model"]["fingerprint"])

    @property
    def model_spec(self) -> str:
        return str(self.manifest["model"].get("spec", ""))

    @property
    def policy_path(self) -> Path:
        return self.path / POLICY

    def check_model(self, model: Any) -> None:
        """Raise one line unless ``model`` has the weights the plans were made for
        (the reorder-stable fingerprint: a model already reordered by a bank still matches)."""
        from casrap.profiles.bank import bank_fingerprint

        key = bank_fingerprint(model)
        if key != self.fingerprint:
            raise CheckpointError(
                f"bundle {self.path} was built for model {self.model_spec or '?'} (fingerprint {self.fingerprint}); "
                f"the loaded model has fingerprint {key}: build a bundle for this model (casrap bundle)"
            )

    def importance(self) -> Any:
        """The bundle's own calibration (``None`` for a bundle written without one)."""
        from casrap.pruners.importance import Importance

        name = (self.manifest.get("calibration") or {}).get("file")
        if not name:
            return None
        return Importance.load(bundle_file(self.path, str(name), "calibration file"), expected_key=self.fingerprint)

    def lowrank_basis(self) -> Any:
        """The bundle's low-rank basis, for its rank plans (one-line error if it has none)."""
        from casrap.pruners.lowrank import LowRankBasis

        name = (self.manifest.get("lowrank_basis") or {}).get("file")
        if not name:
            raise CheckpointError(f"bundle {self.path} has low-rank plans but no low-rank basis; rewrite it with casrap bundle")
        return LowRankBasis.load(bundle_file(self.path, str(name), "low-rank basis"), expected_key=self.fingerprint)

    def build_bank(self, model: Any) -> Any:
        """The ProfileBank of this bundle's exact plans, in action order.

        The base is reordered from the bundle's calibration when a plan slices heads or
        FFN channels, before any profile is built; rank plans use the bundle's basis.
        Nothing under ``$CASRAP_HOME`` is read: the same bundle on the same weights builds
        bitwise the same profiles on every machine.
        """
        from casrap.profiles.bank import ProfileBank, needs_reorder

        self.check_model(model)
        importance = self.importance() if needs_reorder(self.plans) else None
        bank = ProfileBank(model, base_model=self.model_spec, importance=importance, lazy_reorder=False)
        if any(p.ranks for p in self.plans):
            bank.lowrank_basis = self.lowrank_basis()
        for plan in self.plans:
            if plan.name != FULL:
                bank.add(plan)
        bank.lowrank_basis = None
        if bank.names != self.actions:
            raise CheckpointError(f"bundle {self.path}: action order {self.actions} does not start with the full model 'none'")
        return bank

    def load_policy(self) -> Any:
        """The SB3 policy, checked against the manifest's actions and observation."""
        from casrap.agents.training import load_policy

        policy = load_policy(self.policy_path)
        n = int(policy.action_space.n)
        if n != len(self.plans):
            raise CheckpointError(f"bundle {self.path}: policy has {n} actions, the bundle {len(self.plans)} plans")
        shape = tuple(policy.observation_space.shape)
        if shape != (len(OBSERVATION_FEATURES),):
            raise CheckpointError(f"bundle {self.path}: policy expects observations of shape {shape}, casrap builds {len(OBSERVATION_FEATURES)}")
        return policy


def default_bundle_path() -> Path:
    """The bundle shipped with the package, for the embedded SmolLM2-135M."""
    return Path(str(resources.files("casrap.data").joinpath("bundles", "smollm2-135m")))


def bundle_dir_for(checkpoint: Path) -> Path:
    """Where ``casrap train`` writes the bundle of a policy zip: ``NAME.bundle`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".bundle")


def resolve_bundle(source: str | Path | None) -> Path:
    if source is None or str(source) == DEFAULT_BUNDLE:
        return default_bundle_path()
    return Path(source).expanduser()


def load_bundle(source: str | Path | None = None) -> PolicyBundle:
    """Read and check a bundle folder (``None`` or ``"default"``: the shipped one)."""
    path = resolve_bundle(source)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"no policy bundle at {path} (expected {MANIFEST}); write one with casrap bundle") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path / MANIFEST}: {err}") from err
    if manifest.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{path} is not a casrap bundle (format {manifest.get('format')!r}, expected {BUNDLE_FORMAT})")
    spec = manifest.get("observation", {})
    if spec.get("version") != OBSERVATION_VERSION or list(spec.get("features", [])) != list(OBSERVATION_FEATURES):
        raise CheckpointError(
            f"bundle {path} was trained on observation spec v{spec.get('version')} {spec.get('features')}; "
            f"this casrap builds v{OBSERVATION_VERSION}: retrain"
        )
    if not (path / POLICY).is_file():
        raise CheckpointError(f"bundle {path} has no {POLICY}")
    try:
        fingerprint = str(manifest["model"]["fingerprint"])
        files = list(manifest["plans"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"bundle {path}: manifest lacks {err}") from err
    plans = [PruningPlan.load(bundle_file(path, str(f), "plan")) for f in files]
    from casrap.profiles.adapter import plan_adapter_path

    for plan in plans:
        if plan.fingerprint and plan.fingerprint != fingerprint:
            raise CheckpointError(f"bundle {path}: plan {plan.name!r} has fingerprint {plan.fingerprint}, the bundle {fingerprint}")
        plan_adapter_path(plan, confine=path)  # inside the bundle (or the package) and unchanged
    if [p.name for p in plans] != list(manifest.get("actions", [])):
        raise CheckpointError(f"bundle {path}: plans {[p.name for p in plans]} differ from actions {manifest.get('actions')}")
    return PolicyBundle(path, manifest, plans, RuntimeDefaults.from_dict(manifest.get("defaults", {})))


def write_bundle(
    out_dir: Path,
    policy_zip: Path,
    bank: Any,
    model_spec: str,
    reward: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    defaults: RuntimeDefaults | None = None,
    calibration: Path | None = None,
) -> Path:
    """Write a bundle from a trained policy zip and the bank its actions index.

    ``bank.names`` must be the policy's action order (as in the env that trained it).
    The bundle gets the importance the bank was reordered by (else ``calibration``, the
    file the plans were built from), the low-rank basis if a plan has ranks, and a copy
    of every healed plan's adapter beside its plan (``plans/NN.adapter``), pinned by its
    SHA-256: the folder alone rebuilds the bank, on any machine.
    """
    from importlib.metadata import PackageNotFoundError, version

    from casrap.models.architecture import describe

    try:
        casrap_version = version("casrap")
    except PackageNotFoundError:  # running from a source tree
        casrap_version = "unknown"

    out_dir = Path(out_dir)
    if not Path(policy_zip).is_file():
        raise CheckpointError(f"no policy at {policy_zip}")
    files = _write_plans(out_dir, bank)
    shutil.copyfile(policy_zip, out_dir / POLICY)
    info = describe(bank.model)
    cal = _write_calibration(out_dir, bank, calibration)
    basis = _write_basis(out_dir, bank)
    manifest = {
        "format": BUNDLE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "casrap_version": casrap_version,
        "model": {"spec": model_spec, "fingerprint": bank.fingerprint, "model_type": info.model_type, "layers": info.layers,
                  "query_heads": info.query_heads, "kv_heads": info.kv_heads, "ffn_width": info.ffn_width},
        "actions": list(bank.names),
        "plans": files,
        "observation": observation_spec(),
        "reward": reward or {},
        "calibration": cal,
        **({"lowrank_basis": basis} if basis else {}),
        "training": training or {},
        "defaults": (defaults or RuntimeDefaults()).__dict__,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
    return out_dir


def _write_plans(out_dir: Path, bank: Any) -> list[str]:
    """Every action's plan as ``plans/NN.json`` (healed ones with their adapter beside); stale files removed."""
    (out_dir / "plans").mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "plans").glob("*.json"):
        old.unlink()
    files = []
    for index, name in enumerate(bank.names):
        bank.profile(name).plan.fingerprint = bank.fingerprint  # the bank's plans are for this model
        plan = _bundled_plan(bank.profile(name).plan, bank.fingerprint, out_dir / "plans", f"{index:02d}")
        files.append(str(plan.save(out_dir / "plans" / f"{index:02d}.json").relative_to(out_dir)))
    kept = {f"{i:02d}.adapter" for i, n in enumerate(bank.names) if bank.profile(n).plan.meta.get("adapter")}
    for old in (out_dir / "plans").glob("*.adapter"):
        if old.name not in kept:
            shutil.rmtree(old)
    return files


def _write_calibration(out_dir: Path, bank: Any, calibration: Path | None) -> dict[str, Any]:
    """The importance the bank was reordered by (else the calibration file the plans came from)."""
    cal: dict[str, Any] = {"sources": sorted({str(bank.profile(n).plan.meta.get("importance", "")) for n in bank.names} - {""})}
    importance = getattr(bank, "importance", None)
    if importance is not None:
        name = f"{bank.fingerprint}-calibration.safetensors"
        importance.save(out_dir / name)
        cal["file"] = name
    elif calibration is not None and Path(calibration).is_file():
        shutil.copyfile(calibration, out_dir / Path(calibration).name)
        cal["file"] = Path(calibration).name
    return cal


def _write_basis(out_dir: Path, bank: Any) -> dict[str, Any]:
    """The low-rank PCA basis when a plan has ranks ({} otherwise)."""
    if not any(bank.profile(n).plan.ranks for n in bank.names):
        return {}
    from casrap.pruners.lowrank import default_basis_path

    source = default_basis_path(bank.fingerprint)
    if bank.lowrank_basis is not None:
        bank.lowrank_basis.save(out_dir / BASIS)
    elif source.is_file():
        shutil.copyfile(source, out_dir / BASIS)
    else:
        raise CheckpointError(f"the bank has low-rank plans but no basis at {source} to bundle; build them once (casrap bench -p lowrank-25)")
    return {"file": BASIS}


def _bundled_plan(plan: PruningPlan, fingerprint: str, plans_dir: Path, stem: str) -> PruningPlan:
    """A copy of ``plan`` for the bundle: its fingerprint set and, for a healed plan, its
    adapter copied to ``plans_dir/STEM.adapter`` and named relative to the plan, with the
    adapter's SHA-256 pinned (the bank's own plan keeps its adapter reference)."""
    from casrap.profiles.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DIGEST_KEY, adapter_digest, plan_adapter_path

    copy = PruningPlan.from_dict(plan.to_dict())
    copy.fingerprint = fingerprint
    source = plan_adapter_path(plan)
    if source is not None:
        target = plans_dir / f"{stem}.adapter"
        target.mkdir(parents=True, exist_ok=True)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (target / name).exists() or not (target / name).samefile(source / name):
                shutil.copyfile(source / name, target / name)
        copy.meta = {**copy.meta, "adapter": target.name, DIGEST_KEY: adapter_digest(target)}
    return copy
