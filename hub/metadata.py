"""Entry metadata: the pydantic model validated at publish and stored beside each version."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Kind = Literal["base", "adapter", "model"]
KINDS: tuple[str, ...] = ("base", "adapter", "model")

# BCP-47 in the shape people use: language, optional script, optional region, optional variants.
_BCP47 = re.compile(
    r"[a-zA-Z]{2,3}(-[a-zA-Z]{4})?(-([a-zA-Z]{2}|[0-9]{3}))?(-([a-zA-Z0-9]{5,8}|[0-9][a-zA-Z0-9]{3}))*"
)


class EntryMetadata(BaseModel):
    """Everything the registry knows about one version besides its files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind = Field(description="base, adapter or model (a full fine-tuned checkpoint)")
    task: str | None = Field(default=None, description="what the entry was trained for, e.g. text-to-sql")
    language: str | None = Field(default=None, description="BCP-47 tag of the language it serves")
    base: str | None = Field(default=None, description="for adapters and models: the base entry, name@version")
    base_fingerprint: str | None = Field(default=None, description="fingerprint of that base")
    fingerprint: str | None = Field(default=None, description="for bases and models: digest of config and weights")
    source: str | None = Field(default=None, description="where a base came from (a Hub repo id, a GGUF file)")
    architecture: str | None = Field(default=None, description="model_type of the config, for bases and models")
    peft_type: str | None = None
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = Field(default_factory=list)
    size_bytes: int = 0
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    tags: dict[str, str] = Field(default_factory=dict)
    # JSON has no NaN or infinity: stored, they would come back as null and no longer validate
    metrics: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict)
    lineage: dict[str, Any] = Field(default_factory=dict, description="recipe, dataset digest, library versions, ...")

    @field_validator("language")
    @classmethod
    def _bcp47(cls, value: str | None) -> str | None:
        if value is not None and not _BCP47.fullmatch(value):
            raise ValueError(f"{value!r} is not a BCP-47 language tag (e.g. en, es, pt-BR, zh-Hant)")
        return value

    @field_validator("tags")
    @classmethod
    def _tag_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not key or "=" in key or len(key) > 64:
                raise ValueError(f"tag key {key!r} must be 1-64 characters without '='")
        return value


def read_stored(text: str, kind: str) -> EntryMetadata:
    """The metadata of a stored row of an entry of `kind`. A row written before a rule was tightened
    may no longer validate (a NaN metric was once stored, as null): its offending values are dropped,
    so one such row cannot make every listing, gc or removal fail, and the version stays listable
    and removable."""
    data = json.loads(text)
    try:
        return EntryMetadata.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            _drop(data, error["loc"])
    data.setdefault("kind", kind)
    return EntryMetadata.model_validate(data)


def _drop(data: dict[str, Any], loc: tuple[int | str, ...]) -> None:
    """Delete the deepest value that `loc` (a pydantic error location) reaches in `data`."""
    parent, key = None, None
    node: Any = data
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            break
        parent, key, node = node, part, node[part]
    if parent is not None:
        del parent[key]
