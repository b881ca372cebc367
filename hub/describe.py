"""Turns a staged folder plus the publisher's words into validated `EntryMetadata`.

Adapters are checked against their base here: the base must be in the registry, and every
targeted module and tensor shape must fit it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .compat import (check_adapter_fits, check_classifier_model, check_labels_file, checkpoint_shapes,
                     classifier_labels, read_safetensors_header)
from .errors import IncompatibleAdapter, InvalidMetadata, UnsafeContent
from .intake import StagedFile, require_files
from .metadata import EntryMetadata
from .versions import Snapshot

ADAPTER_FILES = {
    "adapter_config.json": "the PEFT config",
    "adapter_model.safetensors": "the adapter weights, as safetensors",
}
CHECKPOINT_FILES = {"config.json": "the model config"}


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsafeContent(f"{what} is not readable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UnsafeContent(f"{what} must hold a JSON object")
    return value


def build_metadata(fields: dict[str, Any]) -> EntryMetadata:
    try:
        return EntryMetadata(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        first = exc.errors()[0]["loc"]
        raise InvalidMetadata(f"invalid metadata: {problems}", str(first[0]) if first else None) from None


def declared_base(staged: list[StagedFile]) -> str | None:
    """The base an adapter folder says it was made for (PEFT's base_model_name_or_path)."""
    require_files(staged, "adapter", ADAPTER_FILES)
    config_file = next(s.source for s in staged if s.relpath == "adapter_config.json")
    return read_json(config_file, "adapter_config.json").get("base_model_name_or_path")


def adapter_fields(staged: list[StagedFile], base: Snapshot) -> dict[str, Any]:
    """Check an adapter folder against `base`; return the metadata fields it implies."""
    require_files(staged, "adapter", ADAPTER_FILES)
    by_name = {s.relpath: s.source for s in staged}
    config = read_json(by_name["adapter_config.json"], "adapter_config.json")
    base_config = read_json(base.path / "config.json", f"config.json of base {base.version.ref}")
    adapter_shapes = read_safetensors_header(by_name["adapter_model.safetensors"])
    check_adapter_fits(config, adapter_shapes, _base_shapes(base, base_config), base.version.ref)
    check_labels_file(by_name.get("labels.json"), config, adapter_shapes)
    targets = config.get("target_modules") or []
    return {
        "base": base.version.ref,
        "base_fingerprint": base.version.metadata.fingerprint,
        "peft_type": config.get("peft_type") or None,
        "rank": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "target_modules": sorted(targets) if isinstance(targets, list) else [targets],
    }


def checkpoint_fields(staged: list[StagedFile], kind: str, base: Snapshot | None) -> dict[str, Any]:
    """Fields of a base or full fine-tuned model; a model must keep its base's architecture."""
    require_files(staged, kind, CHECKPOINT_FILES)
    if not any(s.relpath.endswith(".safetensors") for s in staged):
        raise UnsafeContent(f"a {kind} folder must hold its weights as *.safetensors")
    by_name = {s.relpath: s.source for s in staged}
    config = read_json(by_name["config.json"], "config.json")
    fields: dict[str, Any] = {"architecture": config.get("model_type")}
    if kind == "model":
        if base is None:
            raise InvalidMetadata("a full fine-tuned model must name its base (--base)")
        base_config = read_json(base.path / "config.json", f"config.json of base {base.version.ref}")
        if config.get("model_type") != base_config.get("model_type"):
            raise IncompatibleAdapter(
                f"model architecture {config.get('model_type')!r} differs from base {base.version.ref}'s "
                f"{base_config.get('model_type')!r}"
            )
        shapes = _check_same_shapes(by_name, config, base, base_config)
        check_classifier_model(config, shapes, base.version.ref)
        fields.update(base=base.version.ref, base_fingerprint=base.version.metadata.fingerprint)
    return fields


def _check_same_shapes(files: dict[str, Path], config: dict, base: Snapshot, base_config: dict) -> dict[str, list[int]]:
    """The model's tensor shapes, once every tensor of the base is found among them with its shape
    (but lm_head: a sequence classifier ends in its own head instead)."""
    mine = checkpoint_shapes([f for p, f in sorted(files.items()) if p.endswith(".safetensors")], config)
    theirs = _base_shapes(base, base_config)
    if classifier_labels(config) is not None:
        theirs.pop("lm_head.weight", None)
    for name, shape in sorted(theirs.items()):
        if name in mine and mine[name] != shape:
            raise IncompatibleAdapter(
                f"tensor {name}: shape {mine[name]} in the model but {shape} in base {base.version.ref}"
            )
    missing = sorted(set(theirs) - set(mine))
    if missing:
        raise IncompatibleAdapter(f"the model lacks {len(missing)} tensors of base {base.version.ref}, e.g. {missing[0]}")
    return mine


def _base_shapes(base: Snapshot, base_config: dict) -> dict[str, list[int]]:
    return checkpoint_shapes(sorted(base.path.glob("*.safetensors")), base_config)
