"""The registry's errors. Every refusal is a `HubError` whose message names what was wrong;
callers (CLI, HTTP layer, trainer) map the subclasses to exit codes or status codes."""

from __future__ import annotations


class HubError(Exception):
    """Base class of every refusal the registry makes."""


class InvalidName(HubError):
    """A name, version or alias that is not an identifier (or a malformed reference)."""


class NotFoundError(HubError):
    """A reference that names nothing in the registry."""

    def __init__(self, message: str, suggestions: list[str] | None = None) -> None:
        self.suggestions = suggestions or []
        if self.suggestions:
            message += f" (nearest: {', '.join(self.suggestions)})"
        super().__init__(message)


class UnsafeContent(HubError):
    """A folder that would be unsafe to store: pickle files, links pointing outside it, odd paths."""


class IncompatibleAdapter(HubError):
    """An adapter whose modules or tensor shapes do not fit the base it names."""


class InvalidMetadata(HubError):
    """Metadata that fails validation (unknown kind, malformed language tag, ...). `field` names the
    first metadata field that failed, so a caller can point at the input that held it."""

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class CorruptionError(HubError):
    """A stored file whose bytes no longer hash to its recorded digest."""


class InUseError(HubError):
    """A removal refused because an alias (or another entry) still points at the version."""


class ImportFailed(HubError):
    """A base model that could not be imported from the given source."""


class RemoteError(HubError):
    """A Hugging Face Hub exchange that failed or was refused: endpoint unreachable or offline,
    credentials refused, a server error, or a version tag that already names other files."""
