"""What a bundle records about how its policy was trained, and where it may not match.

A policy trained on a replay recording learned from the profiles *as they were when
recorded*; the bundle's plans are built now, from the current calibration. When a
recorded profile's description (units removed, layers skipped) differs from the plan
built now, the policy's picture of that action is stale: the bundle keeps the
comparison and the CLI says so.
"""

from __future__ import annotations

import re
from typing import Any

from casrap.profiles.catalogue import FULL

_SKIPPED = re.compile(r"layers skipped: \[([\d, ]*)\]$")


def recorded_layer_plans(bank: Any, descriptions: dict[str, str]) -> dict[str, Any]:
    """Layer-skip plans rebuilt exactly as recorded, where the built ones differ.

    A recording's description of a layer profile names the skipped layers, so that
    action can be restored exactly; head and FFN descriptions give only counts.
    """
    from casrap.profiles.plan import PruningPlan

    restored = {}
    for name in bank.names:
        plan = bank.profile(name).plan
        match = _SKIPPED.search(descriptions.get(name, ""))
        if not match or not plan.skip_layers or plan.heads or plan.ffn:
            continue
        layers = sorted(int(x) for x in match.group(1).split(",") if x.strip())
        if layers != sorted(plan.skip_layers):
            restored[name] = PruningPlan(
                name=name, base_model=plan.base_model, description=descriptions[name], skip_layers=layers,
                meta={**plan.meta, "importance": "as recorded", "restored_from_recording": True}, fingerprint=bank.fingerprint,
            )
    return restored


def rebuild_with(bank: Any, replacements: dict[str, Any]) -> Any:
    """A new bank on the same model with some plans replaced, same action order.

    The new bank is the old one's sibling: it keeps the model's layout (the reorder, if
    any) and its settings, and cannot reorder a model the old bank's profiles depend on.
    """
    plans = [replacements.get(n, bank.profile(n).plan) for n in bank.names]
    bank.activate(FULL)
    fresh = bank.sibling()
    for plan in plans:
        if plan.name != FULL:
            fresh.add(plan)
    return fresh


def training_provenance(state: dict[str, Any], bank: Any) -> tuple[dict[str, Any], list[str], Any]:
    """(the manifest's ``training`` section, notes on mismatches, the bank to bundle).

    For a replay-trained policy, layer-skip actions are restored exactly as recorded
    (the returned bank then differs from ``bank``); remaining differences are noted.
    """
    training: dict[str, Any] = {k: v for k, v in state.items() if k not in {"run_dir"}}
    notes: list[str] = []
    replay = state.get("replay")
    if replay:
        from casrap.envs.replay import load_replay

        table = load_replay(replay)
        train = table.subset("train")
        training["prompt_ids"] = sorted({c.split("@")[0] for c in train.context_ids})
        training["replay_model"] = table.header.get("model")
        recorded = dict(table.header.get("descriptions", {}))
        restored = recorded_layer_plans(bank, recorded)
        if restored:
            bank = rebuild_with(bank, restored)
            training["restored_from_recording"] = sorted(restored)
            notes.append(f"layer plans restored exactly as recorded: {', '.join(sorted(restored))}")
        built = {name: bank.profile(name).plan.description for name in bank.names}
        same = {name: recorded.get(name) == built[name] for name in built if name in recorded}
        training["recorded_profiles_match"] = same
        differing = [n for n, ok in same.items() if not ok]
        if differing:
            notes.append(
                f"plans built now differ from the recording for {', '.join(differing)} (calibration changed since it was recorded); "
                "the policy learned those actions' costs from the recorded versions: re-record (casrap record) and retrain to close the gap"
            )
        notes.append("head and FFN plans match the recording in counts only (descriptions name no indices): "
                     "they were rebuilt from this calibration")
        if table.header.get("model") and bank.base_model and table.header["model"] != bank.base_model:
            notes.append(f"the replay was recorded on {table.header['model']}, the bundle's plans are for {bank.base_model}")
    return training, notes, bank
