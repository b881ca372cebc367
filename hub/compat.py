"""Compatibility of an adapter with a base, read from safetensors headers alone (no torch).

The check answers: does every module the adapter targets exist in the base, and does every
tensor's shape fit the module it adapts? A mismatch names the module and both shapes."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from pathlib import Path

from .errors import IncompatibleAdapter, InvalidMetadata, UnsafeContent

MAX_LABELS = 1_000_000  # labels of one classifier; far beyond any real one

# PEFT writes adapter tensors as `base_model.model.<module path>.<lora part>.weight`.
_PEFT_PREFIX = "base_model.model."
_LORA_PART = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.weight)?$")


def read_safetensors_header(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's JSON header."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise UnsafeContent(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise UnsafeContent(f"{path.name} is not a safetensors file (header length {length})")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnsafeContent(f"{path.name} is not a safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise UnsafeContent(f"{path.name} is not a safetensors file: its header is not a JSON object")
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":  # free-form strings, no tensor
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape) \
                or not isinstance(info.get("dtype"), str):
            raise UnsafeContent(f"{path.name} is not a safetensors file: tensor {name!r} has no dtype and "
                                f"shape of non-negative integers ({str(info)[:80]})")
        shapes[name] = shape
    return shapes


def checkpoint_shapes(files: Iterable[Path], config: dict) -> dict[str, list[int]]:
    """Every weight of a checkpoint (all its safetensors shards), with a tied lm_head made explicit."""
    shapes: dict[str, list[int]] = {}
    for file in files:
        shapes.update(read_safetensors_header(file))
    embed = next((n for n in shapes if n.endswith("embed_tokens.weight")), None)
    if "lm_head.weight" not in shapes and embed and config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = shapes[embed]
    return shapes


def _module_matches(module: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def check_target_modules(adapter_config: dict) -> list[str] | str:
    """adapter_config.json's ``target_modules``: a list of module names, or one regular expression."""
    targets = adapter_config.get("target_modules") or []
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise IncompatibleAdapter(f"target_modules in adapter_config.json is not a valid regular expression "
                                      f"({targets!r}: {exc})") from None
    elif not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise IncompatibleAdapter(f"target_modules in adapter_config.json must be a list of module names or one "
                                  f"regular expression, not {str(targets)[:80]}")
    return targets


def check_adapter_fits(
    adapter_config: dict, adapter_shapes: dict[str, list[int]], base_shapes: dict[str, list[int]], base_ref: str
) -> None:
    """Raise `IncompatibleAdapter` naming the first module or shape that does not fit."""
    modules = sorted({n[: -len(".weight")] for n in base_shapes if n.endswith(".weight")})
    targets = check_target_modules(adapter_config)
    if isinstance(targets, list):
        for target in targets:
            if not any(_module_matches(m, [target]) for m in modules):
                kinds = sorted({m.rsplit(".", 1)[-1] for m in modules if ".layers." in m})
                raise IncompatibleAdapter(
                    f"target module {target!r} does not exist in base {base_ref} "
                    f"(its per-layer modules: {', '.join(kinds)})"
                )
    elif not any(_module_matches(m, targets) for m in modules):
        raise IncompatibleAdapter(f"target_modules pattern {targets!r} matches no module of base {base_ref}")

    _check_ranks(adapter_config, adapter_shapes)
    for name, shape in sorted(adapter_shapes.items()):
        key = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
        part = _LORA_PART.search(key)
        module = key[: part.start()] if part else key.removesuffix(".weight")
        # PEFT saves copies of the base weights it wraps as ".base_layer" (embed_tokens, lm_head)
        module = module.replace(".modules_to_save", "").replace(".original_module", "").replace(".base_layer", "")
        base_shape = base_shapes.get(module + ".weight")
        if module == "score" and str(adapter_config.get("task_type") or "").upper() == "SEQ_CLS":
            _check_classifier_head(name, shape, base_shapes, base_ref)
            continue
        if base_shape is None:
            raise IncompatibleAdapter(f"module {module!r} (tensor {name}) does not exist in base {base_ref}")
        _check_shape(name, module, part.group(1) if part else None, shape, base_shape, base_ref)


def _check_ranks(adapter_config: dict, adapter_shapes: dict[str, list[int]]) -> None:
    """Each LoRA A's rank is one the config gives (``r``, or a ``rank_pattern`` value): a config that
    misstates its rank would scale every update wrongly (alpha / r) wherever it is loaded."""
    ranks = [adapter_config.get("r", 8), *(adapter_config.get("rank_pattern") or {}).values()]
    if not all(type(r) is int and r > 0 for r in ranks):
        raise IncompatibleAdapter(f"adapter_config.json: r and rank_pattern values must be positive integers, "
                                  f"not {str(ranks)[:60]}")
    for name, shape in sorted(adapter_shapes.items()):
        if (".lora_A." in name or name.endswith("lora_embedding_A")) and shape and shape[0] not in ranks:
            raise IncompatibleAdapter(f"{name} has rank {shape[0]}, but adapter_config.json gives r={ranks[0]}"
                                      + (f" and rank_pattern ranks {sorted(set(ranks[1:]))}" if ranks[1:] else ""))


def _check_classifier_head(name: str, shape: list[int], base_shapes: dict[str, list[int]], base_ref: str) -> None:
    """A sequence-classification adapter's own head: ``score [labels, hidden]`` over the base's hidden size."""
    hidden = next((v[1] for k, v in base_shapes.items() if k.endswith("embed_tokens.weight")), None)
    if len(shape) != 2 or shape[0] < 1 or (hidden is not None and shape[1] != hidden):
        raise IncompatibleAdapter(f"classification head {name} has shape {shape}, but base {base_ref} needs "
                                  f"[labels, {hidden}]")


def _is_classifier_config(config: dict) -> bool:
    architectures = config.get("architectures") or ()
    return isinstance(architectures, list) and any(str(a).endswith("ForSequenceClassification")
                                                   for a in architectures)


def classifier_labels(config: dict) -> tuple[str, ...] | None:
    """A full checkpoint's label names, read from its ``config.json``, when it is a sequence classifier
    (``*ForSequenceClassification`` among its architectures; transformers' ``LABEL_i`` for unnamed ones), else None.
    Raises `InvalidMetadata` when neither ``id2label`` nor ``num_labels`` gives a usable label count."""
    if not _is_classifier_config(config):
        return None
    id2label = config.get("id2label") if isinstance(config.get("id2label"), dict) else {}
    num_labels = config.get("num_labels")
    count = len(id2label) or (2 if num_labels is None else num_labels)
    # bool is an int to Python, not a count; the cap keeps a typo from building a huge list of names
    if type(count) is not int or not 1 <= count <= MAX_LABELS:
        raise InvalidMetadata(f"num_labels in config.json must be an integer from 1 to {MAX_LABELS}, "
                              f"not {str(count)[:40]!r}")
    return tuple(str(id2label.get(str(i), f"LABEL_{i}")) for i in range(count))


def is_classifier(folder: Path) -> bool:
    """Whether a version's folder holds a sequence classifier: a PEFT SEQ_CLS adapter, or a
    ``*ForSequenceClassification`` checkpoint."""
    try:
        if (folder / "adapter_config.json").is_file():
            config = json.loads((folder / "adapter_config.json").read_text())
            return str(config.get("task_type") or "").upper() == "SEQ_CLS"
        if (folder / "config.json").is_file():
            return _is_classifier_config(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):  # unreadable: whatever loads it next says what is wrong
        pass
    return False


def classifier_label_names(folder: Path) -> list[str] | None:
    """A classifier's label names, as the server answers with them: a SEQ_CLS adapter's
    ``labels.json`` (else ``LABEL_i``, one per row of its head), a full classifier's ``id2label``.
    None for a version that is not a classifier, or whose names cannot be read."""
    if not is_classifier(folder):
        return None
    try:
        if (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            return list(classifier_labels(json.loads((folder / "config.json").read_text())) or ())
        if (folder / "labels.json").is_file():
            names = json.loads((folder / "labels.json").read_text())
            return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None
        shapes = {name: shape for file in sorted(folder.glob("*.safetensors"))
                  for name, shape in read_safetensors_header(file).items()}
    except (OSError, ValueError, UnsafeContent, InvalidMetadata):
        return None
    rows = _head_rows(shapes)
    return None if rows is None else [f"LABEL_{i}" for i in range(rows)]


def _head_rows(adapter_shapes: dict[str, list[int]]) -> int | None:
    """The label count of a SEQ_CLS adapter's head ``score [labels, hidden]`` (None: no head)."""
    return next((shape[0] for name, shape in adapter_shapes.items() if ".score." in f".{name}" and len(shape) == 2),
                None)


def check_labels_file(path: Path | None, adapter_config: dict, adapter_shapes: dict[str, list[int]]) -> None:
    """A classification adapter's ``labels.json`` (the names the server answers with): a list of
    distinct non-empty names, one per row of its head. Other adapters' folders may hold anything."""
    if path is None or str(adapter_config.get("task_type") or "").upper() != "SEQ_CLS":
        return
    try:
        names = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsafeContent(f"labels.json is not readable JSON: {exc}") from None
    rows = _head_rows(adapter_shapes)
    if (not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names) or (rows is not None and len(names) != rows)):
        count = "" if rows is None else f"{rows} "
        raise IncompatibleAdapter(f"labels.json must list {count}distinct non-empty names (one per row of the "
                                  f"classification head), not {str(names)[:80]}")


def check_classifier_model(config: dict, shapes: dict[str, list[int]], base_ref: str) -> None:
    """A full sequence classifier holds its head ``score.weight [labels, hidden]``, one row per label
    its config names."""
    labels = classifier_labels(config)
    if labels is None:
        return
    want, found = [len(labels), config.get("hidden_size")], shapes.get("score.weight")
    if found != want:
        raise IncompatibleAdapter(f"a sequence-classification model on base {base_ref} needs its head score.weight "
                                  f"of shape {want} ({len(labels)} labels in config.json), but it "
                                  + (f"has shape {found}" if found else "holds none"))


def _check_shape(
    name: str, module: str, part: str | None, shape: list[int], base: list[int], base_ref: str
) -> None:
    def refuse(expected: str) -> None:
        raise IncompatibleAdapter(
            f"module {module!r}: adapter tensor {name} has shape {shape}, but base {base_ref} has weight "
            f"shape {base} there, so {expected}"
        )

    if part is None:  # a whole replaced module (modules_to_save) must match exactly
        if shape != base:
            refuse(f"a replacement must have shape {base}")
    elif part == "lora_A":  # [r, in] against a Linear weight [out, in]
        if len(shape) != 2 or len(base) != 2 or shape[1] != base[1]:
            refuse(f"lora_A must be [r, {base[-1]}]")
    elif part == "lora_B":  # [out, r]
        if len(shape) != 2 or shape[0] != base[0]:
            refuse(f"lora_B must be [{base[0]}, r]")
    elif part == "lora_embedding_A":  # [r, num_embeddings] against an Embedding weight [num, dim]
        if len(shape) != 2 or shape[1] != base[0]:
            refuse(f"lora_embedding_A must be [r, {base[0]}]")
    elif part == "lora_embedding_B":  # [dim, r]
        if len(shape) != 2 or shape[0] != base[1]:
            refuse(f"lora_embedding_B must be [{base[1]}, r]")
    elif part == "lora_magnitude_vector":  # DoRA: one magnitude per output feature
        if shape != [base[0]]:
            refuse(f"the DoRA magnitude must be [{base[0]}]")
