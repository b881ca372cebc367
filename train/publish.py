"""Storing a trained result in the registry, through `Registry.publish` only.

Adapters (lora, dora) become kind `adapter` under the recipe's name; a full fine-tune becomes
kind `model` under `<name>-full` (a registry name holds one kind), with its base as lineage.
Each carries its held-out metrics and its lineage: recipe text and digest, dataset digests,
base reference and fingerprint, method, seed, library versions. Publishing moves `latest`."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hotswap.hub import HubError, PublishResult, Registry

from .errors import RecipeError, TrainError
from .recipe import LoadedRecipe
from .run import RECORD_FILES, RunResult


def entry_name(loaded: LoadedRecipe, method: str, name: str | None = None) -> str:
    return name or (f"{loaded.recipe.name}-full" if method == "full" else loaded.recipe.name)


def publish_result(registry: Registry, result: RunResult, name: str | None = None,
                   aliases: tuple[str, ...] = ()) -> PublishResult:
    return _publish(registry, result.loaded, result.method, result.artifact, result.metrics, result.lineage,
                    result.base.ref, name, aliases)


def publish_artifact(registry: Registry, loaded: LoadedRecipe, folder: Path, name: str | None = None,
                     aliases: tuple[str, ...] = ()) -> PublishResult:
    """Publish a result exported earlier (e.g. a recipe's committed artifact/) with its records."""
    records = {}
    for file in RECORD_FILES:
        path = folder / file
        if not path.is_file():
            raise TrainError(f"{folder} lacks {file}; export a run with `hotswap train RECIPE --export DIR`")
        records[file] = json.loads(path.read_text())
    lineage = records["lineage.json"]
    try:
        base = registry.resolve(loaded.recipe.base)
    except HubError as exc:
        raise RecipeError(f"base {loaded.recipe.base!r}: {exc}") from None
    trained_on = lineage.get("base", {}).get("fingerprint")
    if trained_on != base.metadata.fingerprint:
        raise TrainError(f"{folder} was trained on a base with fingerprint {trained_on}, but {base.ref} has "
                         f"{base.metadata.fingerprint}: retrain the recipe on this base")
    return _publish(registry, loaded, lineage["method"], folder, records["metrics.json"]["metrics"], lineage,
                    base.ref, name, aliases)


def _publish(registry: Registry, loaded: LoadedRecipe, method: str, folder: Path, metrics: dict[str, float],
             lineage: dict[str, Any], base_ref: str, name: str | None, aliases: tuple[str, ...]) -> PublishResult:
    recipe = loaded.recipe
    kind = "model" if method == "full" else "adapter"
    with tempfile.TemporaryDirectory(prefix="hotswap-publish-") as tmp:
        staged = Path(tmp)
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name not in RECORD_FILES:
                shutil.copy2(path, staged / path.name)
        return registry.publish(
            staged, name=entry_name(loaded, method, name), kind=kind, base=base_ref,
            task=recipe.task, language=recipe.language,
            tags={"method": method, "recipe": recipe.name, "metric": recipe.metric},
            metrics={k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}, lineage=lineage,
            aliases=aliases,
        )
