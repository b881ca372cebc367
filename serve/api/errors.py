"""Every error the server answers, in OpenAI's shape, from ONE table of exception classes.

The engine, the registry and this layer's own modules raise plain typed exceptions; this table is the
only place that knows their status codes. A class not listed falls back to its nearest listed parent.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable

from litestar import Request, Response
from litestar.exceptions import HTTPException, InternalServerException, ValidationException

from hotswap.hub import (
    CorruptionError,
    HubError,
    ImportFailed,
    InUseError,
    InvalidMetadata,
    InvalidName,
    NotFoundError,
    UnsafeContent,
)
from hotswap.hub import IncompatibleAdapter as HubIncompatible

from ..engine import (
    AdapterNotFound,
    CapacityExceeded,
    EngineError,
    EngineNotReady,
    IncompatibleAdapter,
    InvalidRequest,
    PinnedOut,
    PromptTooLong,
    QueueFull,
)
from .exceptions import ApiProblem, BadReference, BadUpload, Busy, ClientGone, Forbidden, Unauthenticated, UnknownModel
from .metrics import MODEL_SCOPE_KEY
from .openai_schemas import ErrorDetail, ErrorResponse

log = logging.getLogger("hotswap.serve.api")


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    type: str
    code: str | None = None
    retry_after: bool = False  # send Retry-After (settings.retry_after_s)


INVALID = "invalid_request_error"
ERRORS: dict[type[BaseException], ErrorSpec] = {
    # this layer
    Unauthenticated: ErrorSpec(401, "authentication_error", "invalid_api_key"),
    Forbidden: ErrorSpec(403, "permission_error", "forbidden"),
    UnknownModel: ErrorSpec(404, INVALID, "model_not_found"),
    Busy: ErrorSpec(409, "conflict_error", "adapter_busy"),
    BadUpload: ErrorSpec(400, INVALID, "bad_upload"),
    ClientGone: ErrorSpec(499, "client_closed_request"),  # nobody reads it; counted in the metrics
    BadReference: ErrorSpec(400, INVALID, "invalid_name"),
    ApiProblem: ErrorSpec(400, INVALID, "invalid_value"),
    # the engine
    PromptTooLong: ErrorSpec(400, INVALID, "context_length_exceeded"),
    InvalidRequest: ErrorSpec(400, INVALID, "invalid_value"),
    QueueFull: ErrorSpec(429, "rate_limit_error", "queue_full", retry_after=True),
    EngineNotReady: ErrorSpec(503, "service_unavailable_error", "not_ready", retry_after=True),
    AdapterNotFound: ErrorSpec(404, INVALID, "model_not_found"),
    IncompatibleAdapter: ErrorSpec(400, INVALID, "incompatible_adapter"),
    PinnedOut: ErrorSpec(409, "conflict_error", "pinned_out"),
    CapacityExceeded: ErrorSpec(400, INVALID, "capacity_exceeded"),
    EngineError: ErrorSpec(500, "server_error"),
    # the registry
    NotFoundError: ErrorSpec(404, INVALID, "not_found"),
    InvalidName: ErrorSpec(400, INVALID, "invalid_name"),
    InvalidMetadata: ErrorSpec(400, INVALID, "invalid_metadata"),
    UnsafeContent: ErrorSpec(400, INVALID, "unsafe_content"),
    HubIncompatible: ErrorSpec(400, INVALID, "incompatible_adapter"),
    InUseError: ErrorSpec(409, "conflict_error", "in_use"),
    CorruptionError: ErrorSpec(500, "server_error", "corrupt_store"),
    ImportFailed: ErrorSpec(500, "server_error", "import_failed"),
    HubError: ErrorSpec(400, INVALID),
    # the framework: bad bodies, unknown routes, wrong methods, oversized uploads
    ValidationException: ErrorSpec(400, INVALID, "invalid_value"),
    HTTPException: ErrorSpec(500, "server_error"),  # status taken from the exception
    Exception: ErrorSpec(500, "server_error", "internal_error"),
}

_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: INVALID, 405: INVALID, 413: INVALID,
               429: "rate_limit_error", 503: "service_unavailable_error"}


def spec_for(exc: BaseException) -> ErrorSpec:
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            return ERRORS[cls]
    return ERRORS[Exception]


def describe(exc: BaseException, path: str = "") -> tuple[int, ErrorDetail, bool]:
    """(status, body, send Retry-After) for an exception; also used for errors inside a stream."""
    spec = spec_for(exc)
    status, kind, code, param = spec.status, spec.type, spec.code, getattr(exc, "param", None)
    message = str(exc)
    if isinstance(exc, ValidationException):
        message, param = _validation_message(exc)
    elif isinstance(exc, HTTPException):
        status = exc.status_code
        kind = INVALID if 400 <= status < 500 and status not in _HTTP_TYPES else _HTTP_TYPES.get(status, kind)
        message = exc.detail
    elif isinstance(exc, InvalidRequest) and param == "prompt":  # the engine's name; each endpoint has its own
        param = _prompt_field(path)
    elif isinstance(exc, (AdapterNotFound, IncompatibleAdapter)) and param is None:
        param = "ref" if path.startswith("/v1/adapters") else "model"
    elif isinstance(exc, RecursionError) and "deserializing" in message:  # the JSON decoder, on a client's body
        status, kind, code, message = 400, INVALID, None, "the request body is nested too deeply to read"
    elif spec is ERRORS[Exception]:
        log.exception("unexpected error on %s", path, exc_info=exc)
        message = f"internal error ({type(exc).__name__}); see the server log"
    return status, ErrorDetail(message=message or type(exc).__name__, type=kind, param=param, code=code), spec.retry_after


def _prompt_field(path: str) -> str:
    """The body field holding the prompt on the endpoint at ``path``."""
    if path.endswith("chat/completions"):
        return "messages"
    return "input" if path.endswith("classify") else "prompt"


# Path segments pydantic adds for a union's alternatives ("constrained-str", "list[TextPart]", "TextPart"):
# not fields a client wrote, so left out of the path the message names.
_UNION_TAG = re.compile(r"[A-Z]\w*|.*[\[\-].*|str|int|float|bool|dict|list|none")


def _validation_message(exc: ValidationException) -> tuple[str, str | None]:
    """Name each bad field once. A union type reports one error per alternative: the one that got
    deepest into the value says most (an image part: "messages.0.content.0.type: Input should be
    'text'"); alternatives that all failed at the field itself are listed together."""
    by_field: dict[str, list[tuple[str, str]]] = {}
    for item in exc.extra if isinstance(exc.extra, list) else []:
        path = ".".join(p for p in str(item.get("key") or "").split(".") if p and not _UNION_TAG.fullmatch(p))
        by_field.setdefault(path.split(".")[0] or "body", []).append((path or "body", str(item.get("message"))))
    if not by_field:
        return exc.detail, None
    said = []
    for errors in by_field.values():
        deepest = max(path.count(".") for path, _ in errors)
        at = [(path, message) for path, message in errors if path.count(".") == deepest]
        messages = list(dict.fromkeys(message for _, message in at))
        said.append(f"{at[0][0]}: {messages[0] if len(messages) == 1 or deepest else ' or '.join(messages)}")
    return "invalid request: " + "; ".join(said), next(iter(by_field))


# Litestar's 500 when the connection closes before the body is read: the client left, the server is fine
_BODY_CUT_SHORT = "client disconnected prematurely"


def error_response(request: Request, exc: Exception) -> Response[ErrorResponse]:
    if isinstance(exc, InternalServerException) and exc.detail == _BODY_CUT_SHORT:
        exc = ClientGone("the client closed the connection before sending its whole request")
    status, detail, retry = describe(exc, request.url.path)
    services = request.app.state.services
    services.metrics.failed(request.scope.get(MODEL_SCOPE_KEY), status)  # type: ignore[call-overload]
    headers = dict(getattr(exc, "headers", None) or {}) if isinstance(exc, HTTPException) else {}
    if retry:
        headers["Retry-After"] = str(services.settings.retry_after_s)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="hotswap"'
    return Response(ErrorResponse(error=detail), status_code=status, headers=headers)


def exception_handlers() -> dict[type[Exception], Callable[[Request, Any], Response]]:
    """The app's handler table: every class of ERRORS goes through `error_response`."""
    return {cls: error_response for cls in ERRORS if issubclass(cls, Exception)}
