"""The model card (README.md) pushed with a version: the Hub's front matter (base_model,
library_name, language, tags, pipeline_tag, model-index with the metrics), a `hotswap` block that
pull reads back (ref, kind, digest, task, language, tags, metrics, lineage, source), and a readable
summary (ref, digest, base, adapter shape, lineage, how to use it)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .compat import is_classifier
from .errors import InvalidMetadata, NotFoundError
from .registry import Registry
from .versions import Version

# A Hub repo id, ORG/NAME, as huggingface_hub validates it (1-96 characters a part, starting and
# ending with a letter or digit; check_repo_id also refuses '--' and '..').
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(f"{_PART}/{_PART}")


def render_card(registry: Registry, version: Version, repo_id: str, tag: str, folder: Path) -> str:
    """The README.md pushed with a version (its files in ``folder``): Hub front matter plus a readable summary."""
    from huggingface_hub import EvalResult, ModelCardData

    meta = version.metadata
    base_id = _base_source(registry, version, repo_id)
    pipeline = "text-classification" if is_classifier(folder) else "text-generation"
    evals = [EvalResult(task_type=pipeline, task_name=meta.task, dataset_type=_dataset_id(meta.lineage),
                        dataset_name=f"{meta.task or version.name} evaluation", metric_type=name, metric_value=value)
             for name, value in sorted(meta.metrics.items())]
    saved = meta.model_dump(mode="json", include={"task", "language", "tags", "metrics", "lineage", "source"},
                           exclude_none=True)
    data = ModelCardData(
        base_model=base_id, library_name="peft" if version.kind == "adapter" else "transformers",
        language=[meta.language] if meta.language else None, pipeline_tag=pipeline,
        tags=[t for t in ("hotswap", version.kind, (meta.peft_type or "").lower(), meta.task) if t],
        model_name=version.name, eval_results=evals or None,
        hotswap={"ref": version.ref, "kind": version.kind, "digest": version.digest, **saved},
    )
    return f"---\n{data.to_yaml()}\n---\n\n{_card_body(version, base_id, repo_id, tag, pipeline)}"


def _base_source(registry: Registry, version: Version, repo_id: str) -> str | None:
    """The Hub id this version derives from: its base's recorded source (a base: its own source)."""
    source = version.metadata.source
    if version.kind != "base" and version.metadata.base:
        try:
            source = registry.resolve(version.metadata.base).metadata.source
        except NotFoundError:  # the base was removed since; the card just omits it
            source = None
    return source if source and REPO_ID.fullmatch(source) and source != repo_id else None


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _dataset_id(lineage: dict[str, Any]) -> str:
    value = lineage.get("dataset")
    return value if isinstance(value, str) and value else "custom"


def _card_body(version: Version, base_id: str | None, repo_id: str, tag: str, pipeline: str) -> str:
    meta = version.metadata
    base = " ".join(filter(None, [f"`{meta.base}`" if meta.base else None, f"({base_id})" if base_id else None]))
    rows = [("hotswap ref", f"`{version.ref}`"), ("kind", version.kind), ("task", meta.task),
            ("language", meta.language), ("base", base), ("base fingerprint", meta.base_fingerprint), ("fingerprint", meta.fingerprint),
            ("content digest", f"`{version.digest}`"), ("size", f"{meta.size_bytes:,} bytes"),
            ("created", meta.created_at.isoformat())]
    if meta.peft_type:
        rows.append(("adapter", f"{meta.peft_type} rank {meta.rank}, alpha {meta.alpha}, "
                                f"on {', '.join(meta.target_modules)}"))
    rows += [(f"metric `{name}`", f"{value:g}") for name, value in sorted(meta.metrics.items())]
    rows += [(f"tag `{key}`", value) for key, value in sorted(meta.tags.items())]
    lines = [f"# {version.name}, version {version.version}", "",
             f"A hotswap {version.kind} pushed from a hotswap registry. Tag `{tag}` is this version.", "",
             "| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows if v), "",
             "## Lineage", "", "```json", json.dumps(meta.lineage, indent=2, sort_keys=True), "```", "",
             "## Use", "", "```sh", f"hotswap hub pull {repo_id}@{tag} --name {version.name}", "```", ""]
    if version.kind == "adapter" and base_id:
        # a SEQ_CLS adapter's head (modules_to_save) only fits a sequence-classification model
        auto = "AutoModelForSequenceClassification" if pipeline == "text-classification" else "AutoModelForCausalLM"
        lines += ["or with PEFT:", "", "```python", "from peft import PeftModel",
                  f"from transformers import {auto}", "",
                  f'base = {auto}.from_pretrained("{base_id}")',
                  f'model = PeftModel.from_pretrained(base, "{repo_id}", revision="{tag}")', "```", ""]
    return "\n".join(lines)


def read_card(path: Path, repo_id: str) -> dict[str, Any]:
    """The front matter of a card (empty when it has none)."""
    import yaml
    from huggingface_hub.repocard import metadata_load

    try:
        # ValueError: front matter that is not a mapping; YAMLError: not YAML at all
        return metadata_load(path) or {}
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InvalidMetadata(f"the model card (README.md) of {repo_id} has unreadable front matter: {exc}") from None
