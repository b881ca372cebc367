"""Who is calling: bearer keys to principals, and the two guards (any key, admin key).

Keys are kept only as SHA-256 digests. With no keys configured every caller is an anonymous admin;
the server then listens on loopback only (`ServerSettings.check_binding`).
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from .exceptions import Forbidden, Unauthenticated
from .settings import ApiKeySpec

PRINCIPAL_KEY = "hotswap_principal"


@dataclass(frozen=True, slots=True)
class Principal:
    """The holder of one key (or the anonymous admin when auth is off)."""

    name: str
    role: str
    spec: ApiKeySpec | None = None  # None: auth off

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_use(self, name: str) -> bool:
        """May this caller use (and see) the entry called `name`? The base is checked by the caller."""
        return self.spec is None or self.spec.allows(name)

    def visible(self, names: list[str]) -> list[str]:
        return [n for n in names if self.may_use(n)]

    def cache_salt(self, salt: str | None) -> str | None:
        """The prefix-cache salt of this caller's request: its key's own, so that no other key shares, and
        so can probe (by timing, or by `cached_tokens`), the prompt prefixes this key's requests computed."""
        return salt if self.spec is None else f"{self.spec.digest()}\0{salt or ''}"

    def nearest(self, wanted: str, names: list[str]) -> list[str]:
        """Close names among those this caller may see: never hint at another tenant's entries."""
        return difflib.get_close_matches(wanted, self.visible(names), n=3, cutoff=0.5)


ANONYMOUS_ADMIN = Principal("anonymous", "admin")


class KeyRing:
    """Looks up the principal of a bearer token."""

    def __init__(self, keys: list[ApiKeySpec]) -> None:
        self._by_digest = {k.digest(): Principal(k.name, k.role, k) for k in keys}

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS_ADMIN
        if not authorization:
            raise Unauthenticated("missing API key: send the header `Authorization: Bearer <key>`")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed Authorization header: expected `Bearer <key>`")
        principal = self._by_digest.get(hashlib.sha256(token.strip().encode()).hexdigest())
        if principal is None:
            raise Unauthenticated("invalid API key")
        return principal


def principal_of(connection: ASGIConnection) -> Principal:
    """The caller, authenticated once per request and kept in the request's scope."""
    cached = connection.scope.get(PRINCIPAL_KEY)  # type: ignore[misc]
    if cached is None:
        cached = connection.app.state.keyring.authenticate(connection.headers.get("authorization"))
        connection.scope[PRINCIPAL_KEY] = cached  # type: ignore[literal-required]
    return cached


def require_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    principal_of(connection)


def require_admin(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    principal = principal_of(connection)
    if not principal.is_admin:
        raise Forbidden(f"key {principal.name!r} has role {principal.role!r}; this endpoint needs an admin key")


def metrics_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    if not connection.app.state.settings.public_metrics:
        require_admin(connection, handler)


async def provide_principal(request: ASGIConnection) -> Principal:
    return principal_of(request)
