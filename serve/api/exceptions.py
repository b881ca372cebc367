"""Refusals made by the HTTP layer's own logic (auth, model selection, uploads).

Plain exceptions, like the engine's and the registry's: `errors.py` maps all of them to status codes
in one table, so the modules that raise them stay free of HTTP types.
"""

from __future__ import annotations


class ApiProblem(Exception):
    """Base class of the HTTP layer's own refusals."""

    param: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class BadReference(ApiProblem):
    """A malformed model or adapter reference (a bad name, version 0, an empty alias)."""


class Unauthenticated(ApiProblem):
    """No API key, or one the server does not know."""


class Forbidden(ApiProblem):
    """A known key asking for something its role or adapter patterns do not allow."""


class UnknownModel(ApiProblem):
    """A `model` (or adapter reference) that names nothing this caller may use."""

    param = "model"

    def __init__(self, message: str, suggestions: list[str] | None = None, param: str | None = None) -> None:
        self.suggestions = suggestions or []
        if self.suggestions:
            message += f" (nearest: {', '.join(self.suggestions)})"
        super().__init__(message, param)


class Busy(ApiProblem):
    """A management action refused because requests are using the adapter right now."""


class BadUpload(ApiProblem):
    """A publish upload that is not a PEFT adapter folder (missing or unsafe file names)."""

    param = "files"


class ClientGone(ApiProblem):
    """The client closed the connection before the answer was ready (its requests are cancelled)."""
