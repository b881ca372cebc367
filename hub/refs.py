"""Reference syntax shared by the CLI, HTTP and Python: `name`, `name@3`, `name@prod`.

A bare name means the `latest` alias. Names and aliases are identifiers, never paths."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidName

MAX_NAME_LENGTH = 64
MAX_VERSION = 2**31 - 1  # far beyond any real count; keeps numbers inside SQLite's integers
_IDENTIFIER = re.compile(r"[a-z0-9][a-z0-9._-]*")
LATEST = "latest"


def check_identifier(value: str, what: str = "name") -> str:
    """Return `value` if it is a valid identifier, else raise `InvalidName` saying why."""
    if not isinstance(value, str) or not value:
        raise InvalidName(f"{what} must be a non-empty string")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidName(f"{what} {value!r} is longer than {MAX_NAME_LENGTH} characters")
    if not _IDENTIFIER.fullmatch(value) or ".." in value:
        raise InvalidName(
            f"{what} {value!r} is not an identifier: use lower-case letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (names are never paths)"
        )
    return value


def check_alias(value: str) -> str:
    """An identifier that is not all digits: `name@7` always means version 7, so an alias `7` could
    never be reached."""
    check_identifier(value, "alias")
    if re.fullmatch(r"[0-9]+", value):
        raise InvalidName(f"alias {value!r} is a number, which a reference reads as a version; give it a letter")
    return value


@dataclass(frozen=True, slots=True)
class Ref:
    """A parsed reference: exactly one of `version` (an integer) or `alias` is set."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return self.name if self.alias in (None, LATEST) else f"{self.name}@{self.alias}"


def parse_ref(text: str) -> Ref:
    """Parse `name`, `name@3` or `name@alias`; raise `InvalidName` on anything else."""
    if not isinstance(text, str):
        raise InvalidName(f"reference must be a string, got {type(text).__name__}")
    name, sep, selector = text.strip().partition("@")
    check_identifier(name, "name")
    if not sep:
        return Ref(name, alias=LATEST)
    if not selector:
        raise InvalidName(f"reference {text!r} has an empty version after '@'")
    if re.fullmatch(r"[0-9]+", selector):  # not str.isdigit(), which takes '³' and other digits int() refuses
        version = int(selector)
        if not 1 <= version <= MAX_VERSION:
            raise InvalidName(f"reference {text!r}: versions run from 1 to {MAX_VERSION}")
        return Ref(name, version=version)
    return Ref(name, alias=check_identifier(selector, "alias"))
