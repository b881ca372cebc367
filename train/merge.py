"""Combining adapters of one base into a new registry entry with PEFT's `add_weighted_adapter`.

Semantics per target module, for adapters i with weights w_i and scalings s_i = alpha_i/r_i
(the merged adapter has alpha = r, so scaling 1):
  cat:          A = concat_i(w_i s_i A_i), B = concat_i(B_i)   ->  dW = sum_i w_i s_i B_i A_i exactly;
                rank = sum of ranks.
  linear:       A = sum_i sqrt(w_i s_i) A_i, B = sum_i sqrt(w_i s_i) B_i (same rank required); dW has
                cross terms B_i A_j, so it approximates the weighted sum.
  ties:         linear's weighted factors after magnitude pruning to `density` and sign election.
  dare_linear:  linear's weighted factors after random pruning to `density` with rescaling (seeded).

Federated averaging: sites that trained the same recipe on their own data combine their
adapters with weights n_i / N (their example counts). `cat` gives exactly the weighted average
of the sites' weight updates; `linear` keeps the rank but only approximates it."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from hotswap.hub import HubError, PublishResult, Registry, Version

from .errors import MergeError
from .model import canonical_adapter_config, load_base
from .run import library_versions

MERGE_METHODS = ("linear", "ties", "dare_linear", "cat")
DEFAULT_DENSITY = 0.5  # ties and dare_linear keep this fraction of each factor's entries


def _resolve_adapters(registry: Registry, refs: list[str]) -> list[Version]:
    try:
        versions = [registry.resolve(ref) for ref in refs]
    except HubError as exc:
        raise MergeError(str(exc)) from None
    for v in versions:
        if v.kind != "adapter":
            raise MergeError(f"{v.ref} is a {v.kind}; only adapters can be merged")
    bases = {v.metadata.base_fingerprint for v in versions}
    if len(bases) != 1:
        listing = ", ".join(f"{v.ref} on {v.metadata.base}" for v in versions)
        raise MergeError(f"adapters of different bases cannot be merged: {listing}")
    return versions


def merge_adapters(registry: Registry, refs: list[str], weights: list[float], method: str, name: str,
                   density: float | None = None, seed: int = 0, aliases: tuple[str, ...] = ()) -> PublishResult:
    if method not in MERGE_METHODS:
        raise MergeError(f"merge method {method!r} is not one of {', '.join(MERGE_METHODS)}")
    if len(refs) < 2:
        raise MergeError("name at least two adapters to merge")
    if len(weights) != len(refs):
        raise MergeError(f"{len(refs)} adapters but {len(weights)} weights: give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"weights must be finite numbers, not {', '.join(map(str, weights))}")
    if density is not None and not 0 < density <= 1:
        raise MergeError(f"density {density} must be in (0, 1]")
    versions = _resolve_adapters(registry, refs)
    snapshots = [registry.open(v) for v in versions]
    for snap in snapshots:
        config = json.loads((snap.path / "adapter_config.json").read_text())
        if config.get("use_dora"):
            raise MergeError(f"{snap.version.ref} is a DoRA adapter; PEFT has no weighted merge of DoRA magnitudes")
        if str(config.get("task_type") or "").upper() == "SEQ_CLS":
            raise MergeError(f"{snap.version.ref} is a classification adapter; its head does not merge with others")
    base = registry.open(versions[0].metadata.base)

    from peft import PeftModel

    model, _tokenizer = load_base(base.path, torch.device("cpu"))
    model.name_or_path = base.version.metadata.source or base.version.name
    names = [f"a{i}" for i in range(len(versions))]
    peft_model = PeftModel.from_pretrained(model, snapshots[0].path, adapter_name=names[0])
    for adapter_name, snap in zip(names[1:], snapshots[1:]):
        peft_model.load_adapter(snap.path, adapter_name=adapter_name)
    kept = density if density is not None else (DEFAULT_DENSITY if method in ("ties", "dare_linear") else None)
    torch.manual_seed(seed)  # dare_linear prunes at random
    try:
        peft_model.add_weighted_adapter(names, list(weights), "merged", combination_type=method, density=kept)
    except ValueError as exc:
        raise MergeError(f"PEFT refused the merge: {exc}") from None
    # The merged factors already carry each adapter's scaling; the new adapter must scale by exactly
    # 1 (alpha = r), which rsLoRA's alpha/sqrt(r) would not.
    peft_model.peft_config["merged"].use_rslora = False

    lineage = {
        "merged_from": [{"ref": v.ref, "digest": v.digest, "weight": w} for v, w in zip(versions, weights)],
        "method": f"merge:{method}", "density": kept, "seed": seed,
        "base": {"ref": base.version.ref, "fingerprint": base.version.metadata.fingerprint},
        "libraries": library_versions(),
    }
    tasks = {v.metadata.task for v in versions}
    languages = {v.metadata.language for v in versions}
    with tempfile.TemporaryDirectory(prefix="hotswap-merge-") as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=["merged"], safe_serialization=True,
                                   save_embedding_layers=False)
        folder = Path(tmp) / "merged"
        (folder / "README.md").unlink(missing_ok=True)
        canonical_adapter_config(folder / "adapter_config.json")
        return registry.publish(
            folder, name=name, kind="adapter", base=base.version.ref,
            task=tasks.pop() if len(tasks) == 1 else "merged",
            language=languages.pop() if len(languages) == 1 else None,
            tags={"method": f"merge-{method}"}, lineage=lineage, aliases=aliases,
        )
