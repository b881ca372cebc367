"""`create_app`: the Litestar application around one engine and one registry.

The lifespan starts the engine in the background, so the server answers `/health` (and 503 on
`/ready` and on generation) while the base is still loading, and stops it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from hotswap.hub import Registry

from ..engine import Engine
from .auth import KeyRing
from .catalog import Catalog
from .errors import exception_handlers
from .hub_access import HubAccess
from .metrics import ApiMetrics
from .routes_admin import AdaptersController, HubController
from .routes_classify import ClassifyController
from .routes_openai import OpenAIController
from .routes_tokenize import TokenizeController
from .routes_ops import health, metrics, ready
from .services import Services, provide_services
from .settings import ServerSettings

log = logging.getLogger("hotswap.serve.api")


def create_app(engine: Engine, registry: Registry, settings: ServerSettings | None = None) -> Litestar:
    """The HTTP app. `engine` is started by the app's lifespan; `registry` names the store the API
    publishes into and lists (through its own connection, see `hub_access`)."""
    settings = settings or ServerSettings()
    hub = HubAccess(registry.home)
    services = Services(engine=engine, catalog=Catalog(engine, hub, settings), hub=hub, metrics=ApiMetrics(),
                        settings=settings)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        starting = asyncio.create_task(_start(engine, services))
        try:
            yield
        finally:
            await asyncio.shield(starting)  # a base load runs in a thread: let it finish, then stop
            try:
                await engine.stop()
            except Exception:  # noqa: BLE001 - shutting down anyway; say why
                log.exception("stopping the engine failed")
            hub.close()

    # The schema says a key is needed exactly where this server will ask for one.
    keyed = [OpenAIController, TokenizeController, ClassifyController, AdaptersController, HubController] + ([] if settings.public_metrics else [metrics])
    open_ = [health, ready] + ([metrics] if settings.public_metrics else [])
    security = [{"BearerAuth": []}] if settings.auth_enabled else None
    return Litestar(
        route_handlers=[Router(path="/", route_handlers=keyed, security=security), *open_],
        lifespan=[lifespan],
        state=State({"services": services, "settings": settings, "keyring": KeyRing(settings.keys)}),
        dependencies={"services": Provide(provide_services)},
        exception_handlers=exception_handlers(),
        request_max_body_size=settings.max_upload_bytes,
        openapi_config=OpenAPIConfig(
            title="hotswap", version="0.1.0", path="/schema",
            description="One frozen base, many LoRA adapters per batch: OpenAI-compatible generation with "
                        "per-request adapters, adapter management, and the registry over HTTP.",
            components=Components(security_schemes={
                "BearerAuth": SecurityScheme(type="http", scheme="bearer", description="An API key.")}
                if settings.auth_enabled else None),
        ),
    )


async def _start(engine: Engine, services: Services) -> None:
    try:
        await engine.start()
    except Exception as exc:  # noqa: BLE001 - the server stays up to say why on /ready
        if engine.state == "stopped":  # the server is shutting down and stopped it while the base loaded
            log.info("stopped before the base finished loading")
            return
        services.catalog.start_error = f"{type(exc).__name__}: {exc}"
        log.exception("the engine failed to start")
    else:
        log.info("ready: serving base %s", engine.base.ref)
