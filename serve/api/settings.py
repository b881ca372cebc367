"""The server's settings and its API-key file format (pydantic: both come from outside)."""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import json
import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
ENV_KEYS = "HOTSWAP_API_KEYS"  # the same JSON document as a key file
ENV_ADMIN_KEY = "HOTSWAP_ADMIN_KEY"  # one admin key, named "admin"


class KeySettingsError(ValueError):
    """A key file or environment variable that cannot be read; the message says where and why."""


class ApiKeySpec(BaseModel):
    """One API key. Give the secret itself (`key`) or only its SHA-256 (`key_sha256`, hex)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="Who holds the key (named in the log line of each management change).")
    # printable ASCII without spaces: what a header carries unchanged (a padded or non-ASCII key could never match)
    key: str | None = Field(None, min_length=16, pattern=r"^[\x21-\x7e]+$",
                            description="The secret sent as `Authorization: Bearer <key>`.")
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="sha256 hex of the secret.")
    role: Literal["user", "admin"] = "user"
    adapters: list[str] = Field(default_factory=lambda: ["*"], description=(
        "Glob patterns over entry names (adapters and full models) this key may use and list; the base is "
        "always allowed. Admin keys may use everything."))

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKeySpec:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        return self

    def digest(self) -> str:
        return self.key_sha256 or hashlib.sha256(self.key.encode()).hexdigest()  # type: ignore[union-attr]

    def allows(self, name: str) -> bool:
        return self.role == "admin" or any(fnmatch.fnmatchcase(name, p) for p in self.adapters)


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[ApiKeySpec] = Field(default_factory=list)


class ServerSettings(BaseModel):
    """What the HTTP layer needs besides the engine and the registry."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    keys: list[ApiKeySpec] = Field(default_factory=list, description="No keys: open, loopback only.")
    public_metrics: bool = Field(False, description="Serve /metrics without a key (for a scraper on a trusted net).")
    default_max_tokens: int = Field(256, ge=1, description="Chat completions without max_tokens get this many.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 429 and 503.")
    max_upload_bytes: int = Field(2 << 30, ge=1, description="Largest POST /v1/hub/publish body.")
    owned_by: str = "hotswap"

    @model_validator(mode="after")
    def _distinct_keys(self) -> ServerSettings:
        digests = [k.digest() for k in self.keys]
        if len(set(digests)) != len(digests):
            raise ValueError("two API keys share the same secret")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.keys)

    def check_binding(self) -> None:
        """Refuse to listen beyond loopback without keys (raises ValueError saying so)."""
        if not self.auth_enabled and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} without API keys: anyone who can reach it could use and "
                f"manage every adapter. Give --api-keys FILE (or set {ENV_KEYS} / {ENV_ADMIN_KEY}), "
                "or bind 127.0.0.1.")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_keys(path: Path | str | None = None, environ: dict[str, str] | None = None) -> list[ApiKeySpec]:
    """Keys from a JSON or TOML file (`{"keys": [...]}` / `[[keys]]`) plus the environment."""
    environ = dict(os.environ) if environ is None else environ
    keys: list[ApiKeySpec] = []
    if path is not None:
        keys += _parse_key_document(Path(path))
    if text := environ.get(ENV_KEYS):
        keys += _validate(_loads_json(text, f"${ENV_KEYS}"), f"${ENV_KEYS}")
    if secret := environ.get(ENV_ADMIN_KEY):
        keys += _validate({"keys": [{"name": "admin", "key": secret, "role": "admin"}]}, f"${ENV_ADMIN_KEY}")
    return keys


def _parse_key_document(path: Path) -> list[ApiKeySpec]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeySettingsError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise KeySettingsError(f"{path} is not UTF-8 text ({exc})") from None
    if path.suffix.lower() == ".toml":
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise KeySettingsError(f"{path} is not valid TOML: {exc}") from None
    else:
        document = _loads_json(text, str(path))
    return _validate(document, str(path))


def _loads_json(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeySettingsError(f"{where} is not valid JSON (use a .toml name for TOML): {exc}") from None


def _validate(document: object, where: str) -> list[ApiKeySpec]:
    try:
        return KeyFile.model_validate(document).keys
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'document'}: {e['msg']}" for e in exc.errors())
        raise KeySettingsError(f"{where}: {problems}") from None
