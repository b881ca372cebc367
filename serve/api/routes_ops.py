"""Liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

from litestar import Response, get
from litestar.openapi.datastructures import ResponseSpec

from .admin_schemas import Health, Readiness
from .auth import metrics_guard
from .metrics import CONTENT_TYPE, render
from .services import Services, error_responses


@get("/health", tags=["Operations"], summary="Alive: 200 while loading and serving; 503 once the engine cannot serve",
     responses={200: ResponseSpec(Health, description="Alive (the base may still be loading)."),
                503: ResponseSpec(Health, description="The engine failed to start or its loop died: restart.")})
async def health(services: Services) -> Response[Health]:
    """A liveness probe: a server whose engine failed to start or died stays up to say why on /ready,
    but will never serve again, so this tells a supervisor to restart it (as vLLM's /health does)."""
    if reason := services.catalog.down_reason():
        return Response(Health(status="failed", detail=reason), status_code=503)
    return Response(Health())


@get("/ready", tags=["Operations"], summary="Ready: the base is loaded (503 until then)",
     responses={200: ResponseSpec(Readiness, description="Ready."),
                503: ResponseSpec(Readiness, description="Loading, or failed to start (see detail).")})
async def ready(services: Services) -> Response[Readiness]:
    engine = services.engine
    if engine.ready:
        return Response(Readiness(ready=True, base=engine.base.ref))
    detail = services.catalog.down_reason() or "loading the base model"
    return Response(Readiness(ready=False, base=None, detail=detail), status_code=503,
                    headers={"Retry-After": str(services.settings.retry_after_s)})


@get("/metrics", tags=["Operations"], guards=[metrics_guard], media_type=CONTENT_TYPE,
     summary="Prometheus metrics (admin key unless the server runs with public metrics)",
     responses={200: ResponseSpec(str, description="Prometheus text format 0.0.4.", media_type=CONTENT_TYPE),
                **error_responses(401, 403)})
async def metrics(services: Services) -> Response[str]:
    engine = services.engine
    ready_now = engine.ready
    text = render(services.metrics, engine.stats(), engine.residency() if ready_now else [], ready_now)
    return Response(text, media_type=CONTENT_TYPE)
