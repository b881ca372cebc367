"""What a failed exchange with the Hugging Face Hub (or a Hub-compatible endpoint) means, as a HubError
whose message says what to do: a missing repo or revision, offline mode, refused credentials, a
server error, an unreachable endpoint."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import NotFoundError, RemoteError


@contextmanager
def remote_errors(where: str, repo_id: str, rev: str | None, writing: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's exceptions, raised while talking to the endpoint `where`, into HubError
    subclasses that say what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    action = "pushing to" if writing else "downloading"
    try:
        yield
    except RevisionNotFoundError:
        raise NotFoundError(f"{repo_id} on {where} has no revision {rev!r} (a branch, tag or commit id)"
                            f"{_known_refs(where, repo_id)}") from None
    except RepositoryNotFoundError:
        raise NotFoundError(f"no repo {repo_id!r} on {where} (or it is private and HF_TOKEN does not give "
                            "access to it)") from None
    except OfflineModeIsEnabled:
        raise RemoteError(f"HF_HUB_OFFLINE is set: {action} {repo_id} needs {where}; unset it") from None
    except LocalEntryNotFoundError as exc:
        if constants.is_offline_mode():
            raise RemoteError(f"HF_HUB_OFFLINE is set and {repo_id}@{rev or 'main'} is not in the Hugging Face "
                              "cache; unset HF_HUB_OFFLINE to download it") from None
        raise RemoteError(f"{action} {repo_id} from {where} failed: {exc}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            need = "write" if writing else "read"
            raise RemoteError(f"{where} refused {action} {repo_id} (HTTP {status}): set HF_TOKEN to a token "
                              f"with {need} access") from None
        why = exc.server_message or str(exc).strip().splitlines()[0]
        raise RemoteError(f"{action} {repo_id}: {where} answered HTTP {status}: {why}") from None
    except _transport_errors() as exc:
        raise RemoteError(f"cannot reach {where} ({type(exc).__name__}: {exc}); check HF_ENDPOINT and the "
                          "network") from None


def _known_refs(where: str, repo_id: str) -> str:
    from huggingface_hub import HfApi

    try:
        refs = HfApi(endpoint=where).list_repo_refs(repo_id)
    except Exception:  # only a hint for the message; the lookup itself already failed
        return ""
    return (f" (branches: {', '.join(b.name for b in refs.branches) or 'none'}; "
            f"tags: {', '.join(t.name for t in refs.tags) or 'none'})")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures raised below huggingface_hub (its HTTP client changed across releases)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)
