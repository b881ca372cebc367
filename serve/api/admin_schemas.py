"""Bodies of the management endpoints (adapters, residency, publishing, aliases) and of health."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

Tier = Literal["disk", "host", "device", "loading"]
Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")]


class Residency(BaseModel):
    """Where a version is held now: only on disk, cached on the host, or in a device slot."""

    tier: Tier
    pinned: bool = Field(False, description="Pinned by an admin: never evicted until unpinned.")
    pins: int = Field(0, description="Running requests plus manual pins holding it.")
    device_bytes: int = Field(0, description="Device bytes it occupies (LoRA rows, or a full model's weights).")
    last_used: float | None = Field(None, description="Unix time of the last request that used it.")


class AdapterInfo(BaseModel):
    """One version of an adapter (or of a full model) in the registry, with its residency."""

    ref: str = Field(description="name@version")
    name: str
    version: int
    kind: Literal["adapter", "model"]
    aliases: list[str] = Field(description="Aliases that point at this version (latest included).")
    digest: str
    base: str | None = Field(description="The base it was published for, name@version.")
    servable: bool = Field(description="It fits the base this server runs (same base fingerprint).")
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = Field(default_factory=list)
    task: str | None = None
    language: str | None = None
    labels: list[str] | None = Field(None, description="For a classifier: its label names (None otherwise).")
    size_bytes: int
    created: int
    residency: Residency


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class UnloadResult(BaseModel):
    ref: str
    unloaded: bool = Field(description="False when it was held only on disk already.")
    residency: Residency


class PublishResponse(BaseModel):
    """What POST /v1/hub/publish stored."""

    ref: str = Field(description="name@version, ready to use as `model`.")
    name: str
    version: int
    digest: str
    created: bool = Field(description="False when identical content was already stored as this version.")
    aliases: list[str]
    base: str | None
    rank: int | None
    target_modules: list[str]


class AliasMove(BaseModel):
    """PUT /v1/hub/{name}/aliases/{alias}: point the alias at a version (its number)."""

    version: int = Field(ge=1, le=2**31 - 1, description="The version the alias will name.")


class AliasInfo(BaseModel):
    name: str
    alias: str
    version: int | None = Field(description="The version it names now; null once removed.")
    previous: int | None = Field(None, description="The version it named before this change.")
    at: str | None = Field(None, description=(
        "When the change was made (ISO 8601, UTC): in an entry's history; null in a move's own answer."))


class EntryInfo(BaseModel):
    """GET /v1/hub/{name}: every version and alias of one entry."""

    name: str
    kind: Literal["base", "adapter", "model"]
    versions: list[int]
    aliases: dict[str, int]
    history: list[AliasInfo] = Field(description="Alias moves, oldest first.")


class Health(BaseModel):
    status: Literal["ok", "failed"] = "ok"
    detail: str | None = Field(None, description="Why the engine will not serve (failed to start, or its loop died).")


class Readiness(BaseModel):
    ready: bool
    base: str | None = Field(description="The base's name@version once loaded.")
    detail: str | None = Field(None, description="Why it is not ready (loading, failed to start).")
