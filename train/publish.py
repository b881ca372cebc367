"""Storing a trained result in the registry, through `Registry.publish` only.

Adapters (lora, dora) become kind `adapter` under the recipe's name; a full fine-tune becomes
kind `model` under `<name>-full` (a registry name holds one kind), with its base as lineage.
Each carries its held-out metrics and its lineage: recipe text and digest, dataset digests,
base reference and fingerprint, method, seed, library versions. Publishing moves `latest`."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hotswap.hub import HubError, PublishResult, Registry

from .errors import RecipeError, TrainError
from .recipe import METHODS, LoadedRecipe
from .run import ARTIFACT_DIR, RECORD_FILES, RunResult


def entry_name(loaded: LoadedRecipe, method: str, name: str | None = None) -> str:
    return name or (f"{loaded.recipe.name}-full" if method == "full" else loaded.recipe.name)


def publish_result(registry: Registry, result: RunResult, name: str | None = None,
                   aliases: tuple[str, ...] = ()) -> PublishResult:
    return _publish(registry, result.loaded, result.method, result.artifact, result.metrics, result.lineage,
                    result.base.ref, name, aliases)


def publish_artifact(registry: Registry, loaded: LoadedRecipe, folder: Path, name: str | None = None,
                     aliases: tuple[str, ...] = ()) -> PublishResult:
    """Publish a result exported earlier (e.g. a recipe's committed artifact/) with its records; a run
    folder, or its artifact/, works too (the run keeps its records beside artifact/)."""
    files, records = _locate(folder)
    metrics, lineage = _read_records(records)
    try:
        base = registry.resolve(loaded.recipe.base)
    except HubError as exc:
        raise RecipeError(f"base {loaded.recipe.base!r}: {exc}") from None
    trained_by = (lineage.get("recipe") or {}).get("name")
    if trained_by != loaded.recipe.name:  # else its name, task, language and metric tags would be another's
        raise TrainError(f"{folder} was trained by recipe {trained_by!r}, not {loaded.recipe.name!r}: publish it "
                         "with its own recipe")
    trained_on = lineage["base"]["fingerprint"]
    if trained_on != base.metadata.fingerprint:
        raise TrainError(f"{folder} was trained on a base with fingerprint {trained_on}, but {base.ref} has "
                         f"{base.metadata.fingerprint}: retrain the recipe on this base")
    return _publish(registry, loaded, lineage["method"], files, metrics, lineage, base.ref, name, aliases)


def _locate(folder: Path) -> tuple[Path, Path]:
    """(the result's files, the folder of its records)."""
    def has_records(path: Path) -> bool:
        return all((path / file).is_file() for file in RECORD_FILES)
    if has_records(folder) and not (folder / ARTIFACT_DIR).is_dir():
        return folder, folder  # an export: files and records together
    if has_records(folder):
        return folder / ARTIFACT_DIR, folder  # a run folder
    if folder.name == ARTIFACT_DIR and has_records(folder.parent):
        return folder, folder.parent  # a run's artifact/
    missing = next(file for file in RECORD_FILES if not (folder / file).is_file())
    raise TrainError(f"{folder} lacks {missing}; give an exported result (`hotswap train RECIPE --export DIR`) "
                     "or a run folder")


def _read_records(folder: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """(held-out metrics, lineage), each record checked for what publishing reads."""
    found = {}
    for file in RECORD_FILES:
        try:
            found[file] = json.loads((folder / file).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TrainError(f"{folder / file} is not readable JSON: {exc}") from None
    metrics, lineage = found["metrics.json"].get("metrics"), found["lineage.json"]
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) or v is None for v in metrics.values()):
        raise TrainError(f"{folder / 'metrics.json'}: \"metrics\" must map metric names to numbers")
    base = lineage.get("base") if isinstance(lineage, dict) else None
    if (not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str)
            or lineage.get("method") not in METHODS):
        raise TrainError(f"{folder / 'lineage.json'} must give \"method\" ({', '.join(METHODS)}) and "
                         "\"base\": {\"fingerprint\": ...}")
    return metrics, lineage


def _publish(registry: Registry, loaded: LoadedRecipe, method: str, folder: Path, metrics: dict[str, float],
             lineage: dict[str, Any], base_ref: str, name: str | None, aliases: tuple[str, ...]) -> PublishResult:
    recipe = loaded.recipe
    kind = "model" if method == "full" else "adapter"
    with _without_records(folder) as files:
        return registry.publish(
            files, name=entry_name(loaded, method, name), kind=kind, base=base_ref,
            task=recipe.task, language=recipe.language,
            tags={"method": method, "recipe": recipe.name, "metric": recipe.metric},
            metrics={k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}, lineage=lineage,
            aliases=aliases,
        )


@contextmanager
def _without_records(folder: Path) -> Iterator[Path]:
    """The result's files without its records, as a temporary folder of hard links to them (copies
    only across file systems): a full model is not written out twice, and a publish killed mid-way
    leaves no copy of it behind."""
    with tempfile.TemporaryDirectory(prefix="hotswap-publish-") as tmp:
        staged = Path(tmp)
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name not in RECORD_FILES:
                try:
                    os.link(path, staged / path.name)
                except OSError:  # another file system, or one without hard links
                    shutil.copy2(path, staged / path.name)
        yield staged
