"""hotswap's HTTP server: OpenAI-compatible generation, adapter management, auth and metrics."""

from .app import create_app
from .settings import ApiKeySpec, ServerSettings, load_keys

__all__ = ["ApiKeySpec", "ServerSettings", "create_app", "load_keys"]
