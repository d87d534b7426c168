"""The policy bundle: everything needed to run a trained policy exactly as it was trained.

A checkpoint that stores profile *names* is not enough: re-running calibration
changes what ``ffn-8`` means, silently. A bundle therefore stores, in one folder:

- ``policy.zip``: the Stable-Baselines3 policy;
- ``plans/NN.json``: the exact :class:`PruningPlan` of every action, in action order;
- ``bundle.json``: the manifest: format, model spec and weight fingerprint, action
  names, the observation spec (features, scales, version), reward settings, the
  calibration the plans were built from, training provenance (replay file, prompt
  keys) and the runtime defaults (latency budget when none is asked for).

Loading checks all of it and fails with one line (:class:`CheckpointError`) on a
format, observation-spec, action-count or model-fingerprint mismatch: a policy must
never run on actions or observations other than those it was trained on.

Policy zips are pickles: load only bundles you trust (SB3's loader is given
``custom_objects`` for schedules, but the file still unpickles its spaces).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from casrap.envs.observation import OBSERVATION_FEATURES, OBSERVATION_VERSION, PPL_SCALE, RUN_QUEUE_SCALE, TARGET_SCALE, TOKENS_SCALE
from casrap.errors import CheckpointError
from casrap.profiles.plan import PruningPlan

BUNDLE_FORMAT = "casrap-bundle/1"
MANIFEST = "bundle.json"
POLICY = "policy.zip"
DEFAULT_BUNDLE = "default"


def observation_spec() -> dict[str, Any]:
    """The observation this code builds; a bundle trained on another one is refused."""
    return {
        "version": OBSERVATION_VERSION,
        "features": list(OBSERVATION_FEATURES),
        "scales": {"prompt_tokens": TOKENS_SCALE, "prompt_ppl": PPL_SCALE, "latency_target": TARGET_SCALE, "run_queue": RUN_QUEUE_SCALE},
    }


@dataclass
class RuntimeDefaults:
    """What the runtime does when a request leaves something out.

    Attributes:
        budget_ratio: latency target as a multiple of the predicted *unloaded*
            full-model latency when a request names no target. The upper end of the
            training range: generous enough that the policy keeps quality when the
            machine is free, inside the range the policy has seen.
        max_new_tokens: new tokens when a request names no limit.
        analysis_tokens: leading prompt tokens scored for the perplexity feature
            (as in training).
        queue_weight: each request waiting behind this one shrinks its budget by
            this share (``budget / (1 + w * waiting)``), so a queue pushes the policy
            towards faster profiles.
    """

    budget_ratio: float = 3.0
    max_new_tokens: int = 64
    analysis_tokens: int = 64
    queue_weight: float = 0.5

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeDefaults:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


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
        """Raise one line unless ``model`` has the weights the plans were made for."""
        from casrap.models.architecture import model_key

        key = model_key(model)
        if key != self.fingerprint:
            raise CheckpointError(
                f"bundle {self.path} was built for model {self.model_spec or '?'} (fingerprint {self.fingerprint}); "
                f"the loaded model has fingerprint {key}: build a bundle for this model (casrap bundle)"
            )

    def build_bank(self, model: Any) -> Any:
        """The ProfileBank of this bundle's exact plans, in action order (no calibration)."""
        from casrap.profiles.bank import ProfileBank

        self.check_model(model)
        bank = ProfileBank(model, base_model=self.model_spec)
        for plan in self.plans:
            if plan.name != "none":
                bank.add(plan)
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
    plans = [PruningPlan.load(path / f) for f in files]
    for plan in plans:
        if plan.fingerprint and plan.fingerprint != fingerprint:
            raise CheckpointError(f"bundle {path}: plan {plan.name!r} has fingerprint {plan.fingerprint}, the bundle {fingerprint}")
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
    ``calibration`` (the importance file the plans were built from) is copied in for
    provenance; the plans alone rebuild the bank.
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
    (out_dir / "plans").mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "plans").glob("*.json"):
        old.unlink()
    files = []
    for index, name in enumerate(bank.names):
        plan = bank.profile(name).plan
        plan.fingerprint = bank.fingerprint
        files.append(str(plan.save(out_dir / "plans" / f"{index:02d}.json").relative_to(out_dir)))
    shutil.copyfile(policy_zip, out_dir / POLICY)
    info = describe(bank.model)
    cal: dict[str, Any] = {"sources": sorted({str(bank.profile(n).plan.meta.get("importance", "")) for n in bank.names} - {""})}
    if calibration is not None and Path(calibration).is_file():
        shutil.copyfile(calibration, out_dir / Path(calibration).name)
        cal["file"] = Path(calibration).name
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
        "training": training or {},
        "defaults": (defaults or RuntimeDefaults()).__dict__,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
    return out_dir
