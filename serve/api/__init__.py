"""hotswap's HTTP server: OpenAI-compatible generation, adapter management, auth and metrics.

Names are imported on first use, so `hotswap bench` (which shares the CLI module) and
`hotswap serve --help` do not import the server and the engine.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {"create_app": ".app", "ApiKeySpec": ".settings", "ServerSettings": ".settings", "load_keys": ".settings"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
