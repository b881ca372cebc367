"""What the route handlers share, built once by `create_app` and handed out by dependency injection."""

from __future__ import annotations

from dataclasses import dataclass

from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec

from ..engine import Engine
from .catalog import Catalog
from .hub_access import HubAccess
from .metrics import ApiMetrics
from .openai_schemas import ErrorResponse
from .settings import ServerSettings


@dataclass(slots=True)
class Services:
    engine: Engine
    catalog: Catalog
    hub: HubAccess
    metrics: ApiMetrics
    settings: ServerSettings


async def provide_services(state: State) -> Services:
    return state.services


_ERROR_TEXT = {
    400: "Bad parameters; `error.param` names the field.",
    401: "Missing or unknown API key.",
    403: "The key's role or adapter patterns do not allow this.",
    404: "Unknown model or adapter; the message lists the nearest names the key may use.",
    409: "The adapter is in use (adapter_busy), or fits only in device rows that manually pinned adapters hold "
         "(pinned_out: unpin one).",
    413: "The body is larger than the server accepts.",
    429: "The queue is full; retry after `Retry-After` seconds.",
    503: "The base model is still loading, or the server is stopping; retry after `Retry-After` seconds. (Or its "
         "engine failed to start or died: the message says why.)",
}


def error_responses(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the error statuses an endpoint can answer (all in OpenAI's error shape)."""
    return {c: ResponseSpec(ErrorResponse, description=_ERROR_TEXT[c], generate_examples=False) for c in codes}
