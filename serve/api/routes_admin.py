"""Management endpoints (admin key): adapter residency, publishing into the registry, alias moves."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Literal

from litestar import Controller, Request, delete, get, post, put
from litestar.enums import RequestEncodingType
from litestar.params import Body, Parameter

from ..engine import Target
from ..lora.compose import is_composite
from .admin_schemas import AdapterInfo, AdapterList, AliasInfo, AliasMove, EntryInfo, PublishResponse, Tier, UnloadResult
from .auth import ANONYMOUS_ADMIN, principal_of, require_admin
from .exceptions import ApiProblem, Busy
from .openai_schemas import NAME_PATTERN, REF_PATTERN
from .publishing import PublishForm, alias_info, entry_info, publish_upload, remove_alias
from .services import Services, error_responses

log = logging.getLogger("hotswap.serve.api")
REF_DOC = "An adapter or full model: `name`, `name@3` or `name@alias`."
Ref = Annotated[str, Parameter(description=REF_DOC, min_length=1, max_length=129, schema_extra={"pattern": REF_PATTERN})]
Name = Annotated[str, Parameter(description="An entry name.", min_length=1, max_length=64,
                                schema_extra={"pattern": NAME_PATTERN})]
Alias = Annotated[str, Parameter(description="An alias (not a number).", min_length=1, max_length=64,
                                 schema_extra={"pattern": NAME_PATTERN})]
RemovableAlias = Annotated[str, Parameter(description="An alias other than `latest` (publish maintains it).",
                                          min_length=1, max_length=64,
                                          schema_extra={"pattern": "^(?!latest$)" + NAME_PATTERN[1:]})]


class AdaptersController(Controller):
    path = "/v1/adapters"
    tags = ["Management"]
    guards = [require_admin]

    @get("/", summary="Every adapter and full-model version, with residency (disk, host, device; pinned)",
         responses=error_responses(400, 401, 403, 503))
    async def list_adapters(self, services: Services,
                            kind: Annotated[Literal["adapter", "model"] | None, Parameter(description="Only this kind")] = None,
                            tier: Annotated[Tier | None, Parameter(description="Only entries held in this tier")] = None,
                            ) -> AdapterList:
        return AdapterList(data=await services.catalog.adapters(kind, tier))

    @get("/{ref:str}", summary="One adapter version and its residency", responses=error_responses(400, 401, 403, 404, 503))
    async def get_adapter(self, ref: Ref, services: Services) -> AdapterInfo:
        return await services.catalog.adapter(ref)

    @post("/{ref:str}/load", status_code=200, summary="Bring it to a device slot (a full model: into memory)",
          responses=error_responses(400, 401, 403, 404, 409, 503))
    async def load(self, request: Request, ref: Ref, services: Services) -> AdapterInfo:
        target = await _entry(services, ref)
        await services.engine.load(target.ref)
        _audit(request, "loaded", target.ref)
        return await services.catalog.adapter(target.ref)

    @post("/{ref:str}/unload", status_code=200, summary="Drop it from device and host caches (409 while in use)",
          responses=error_responses(400, 401, 403, 404, 409, 503))
    async def unload(self, request: Request, ref: Ref, services: Services) -> UnloadResult:
        target = await _entry(services, ref)
        before = await services.catalog.adapter(target.ref)
        if before.residency.tier == "disk":
            return UnloadResult(ref=target.ref, unloaded=False, residency=before.residency)
        if not await services.engine.unload(target.ref):
            held = before.residency  # its pins count running requests plus a manual pin
            raise Busy(f"{target.ref} is in use (running requests: {held.pins - int(held.pinned)}, pinned: "
                       f"{str(held.pinned).lower()}); unpin it or retry when its requests end", "ref")
        _audit(request, "unloaded", target.ref)
        after = await services.catalog.adapter(target.ref)
        return UnloadResult(ref=target.ref, unloaded=True, residency=after.residency)

    @post("/{ref:str}/pin", status_code=200, summary="Load it and keep it resident until unpinned",
          responses=error_responses(400, 401, 403, 404, 409, 503))
    async def pin(self, request: Request, ref: Ref, services: Services) -> AdapterInfo:
        target = await _entry(services, ref)
        await services.engine.pin(target.ref)
        _audit(request, "pinned", target.ref)
        return await services.catalog.adapter(target.ref)

    @post("/{ref:str}/unpin", status_code=200, summary="Let it be evicted again when space is needed",
          responses=error_responses(400, 401, 403, 404, 503))
    async def unpin(self, request: Request, ref: Ref, services: Services) -> AdapterInfo:
        target = await _entry(services, ref)
        info = await services.catalog.adapter(target.ref)
        if not info.residency.pinned:  # nothing to do
            return info
        services.engine.unpin(target.ref)
        _audit(request, "unpinned", target.ref)
        return await _unpinned(services, target.ref)


def _audit(request: Request, done: str, what: str) -> None:
    """One log line per change an admin made, naming the key that made it."""
    log.info("key %r %s %s", principal_of(request).name, done, what)


async def _unpinned(services: Services, ref: str, timeout_s: float = 5.0) -> AdapterInfo:
    """`Engine.unpin` only queues the change for the engine thread: wait until it shows."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = await services.catalog.adapter(ref)
        if not info.residency.pinned or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.005)


async def _entry(services: Services, ref: str) -> Target:
    if is_composite(ref):  # refused before the engine acts, so nothing is loaded or pinned that these can't undo
        raise ApiProblem(f"{ref!r} is a combination of adapters: combinations are built on demand by requests "
                         "and evicted like any adapter; load, pin, unpin or unload its parts", "ref")
    target = await services.catalog.resolve(ref, ANONYMOUS_ADMIN, param="ref")
    if target.kind == "base":
        raise ApiProblem(f"{ref!r} is the base, which is always loaded; name an adapter or a full model", "ref")
    return target


class HubController(Controller):
    path = "/v1/hub"
    tags = ["Registry"]
    guards = [require_admin]

    @post("/publish", status_code=201, summary="Upload a PEFT adapter's files; the registry checks them against the base",
          responses=error_responses(400, 401, 403, 404, 409, 413, 503))
    async def publish(self, request: Request,
                      data: Annotated[PublishForm, Body(media_type=RequestEncodingType.MULTI_PART)],
                      services: Services) -> PublishResponse:
        published = await publish_upload(data, services)
        _audit(request, "published" if published.created else "published again (unchanged)", published.ref)
        return published

    @get("/{name:str}", summary="Versions, aliases and alias history of one entry", responses=error_responses(400, 401, 403, 404))
    async def get_entry(self, name: Name, services: Services) -> EntryInfo:
        return await services.hub.run(lambda reg: entry_info(reg, name))

    @put("/{name:str}/aliases/{alias:str}", summary="Point an alias at a version (atomic; recorded in the history)",
         responses=error_responses(400, 401, 403, 404))
    async def move_alias(self, request: Request, name: Name, alias: Alias, data: AliasMove,
                         services: Services) -> AliasInfo:
        moved = await services.hub.run(lambda reg: alias_info(reg, name, alias, data.version))
        was = "" if moved.previous is None else f" (was {moved.previous})"
        _audit(request, "pointed", f"{name}@{alias} at version {moved.version}{was}")
        return moved

    @delete("/{name:str}/aliases/{alias:str}", status_code=200, summary="Remove an alias (not `latest`)",
            responses=error_responses(400, 401, 403, 404))
    async def delete_alias(self, request: Request, name: Name, alias: RemovableAlias,
                           services: Services) -> AliasInfo:
        removed = await services.hub.run(lambda reg: remove_alias(reg, name, alias))
        _audit(request, "removed", f"{name}@{alias} (it named version {removed.previous})")
        return removed
