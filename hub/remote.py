"""Hugging Face Hub interop. `push_version` uploads a version with a generated model card in one
commit and tags that commit; `pull_version` downloads a repo revision and publishes it through
`Registry.publish`, so a pulled version passes every check a local publish does.

Conventions (a repo holds the versions of one entry):
- Version N is the tag `vN`; `main` follows the last push. Pushing a version whose tag already
  holds the same files changes nothing; a tag holding other files is never moved (someone may pin
  it), the push is refused instead.
- The repo holds the version's files under their own names plus a generated `README.md` card. A
  version's own README.md (PEFT writes one) travels as `.hotswap/README.md` and pull puts it back,
  so a pushed-then-pulled version has the same digest.
- The card (`card.py`) carries the Hub's fields and a `hotswap` block that pull reads back (kind,
  task, language, tags, metrics, lineage, source).

Environment, as huggingface_hub reads it: HF_ENDPOINT (a mirror or Hub-compatible server; re-read
at each call), HF_TOKEN (credentials), HF_HUB_OFFLINE (push is refused; pull takes the revision
from the Hugging Face cache, where some earlier download must have put all of its wanted files).

Online pulls download into a temporary folder inside the registry home, not into the Hugging Face
cache: the registry keeps its own content-addressed copy, so a cache copy would double the disk."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .card import REPO_ID, read_card, render_card
from .errors import InvalidName, NotFoundError, RemoteError, UnsafeContent
from .intake import CONVERT_HINT, PICKLE_SUFFIXES, plain_relative
from .refs import check_identifier
from .registry import Registry
from .remote_errors import remote_errors
from .scratch import scratch_folder
from .versions import PublishResult

CARD = "README.md"
ORIGINAL_README = ".hotswap/README.md"
HUB_FILES = {CARD, ".gitattributes"}  # the card, and the file the Hub adds to every new repo


def endpoint() -> str:
    """HF_ENDPOINT if set now, else huggingface_hub's endpoint (HF_ENDPOINT as it read it at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise InvalidName(f"{repo_id!r} is not a Hub repo id (ORG/NAME: letters, digits, '.', '_', '-')")
    return repo_id


def parse_repo_spec(spec: str) -> tuple[str, str | None]:
    """`org/name` or `org/name@rev` (rev: a branch, tag or commit id) -> (repo_id, rev or None)."""
    repo_id, sep, rev = spec.strip().partition("@")
    if sep and not rev:
        raise InvalidName(f"{spec!r} has an empty revision after '@'")
    return check_repo_id(repo_id), rev or None


# --- push ------------------------------------------------------------------------------------
def push_version(registry: Registry, ref: str, repo_id: str, private: bool = False) -> dict[str, Any]:
    """Upload a version and its card to `repo_id` in one commit tagged `v<version>`.

    `private` applies only when the repo is created here (without it, the Hub's default visibility).
    Returns ref, repo_id, tag, commit, url, digest and `created` (False when the tag already held
    these files: nothing was uploaded)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    check_repo_id(repo_id)
    snapshot = registry.open(ref)  # verifies every file against its digest before anything leaves
    version = snapshot.version
    files = {(ORIGINAL_README if path == CARD else path): (snapshot.path / path, sha)
             for path, sha, _size in registry.files(version)}
    tag = f"v{version.version}"
    card = render_card(registry, version, repo_id, tag, snapshot.path)
    api = HfApi(endpoint=endpoint())
    result = {"ref": version.ref, "repo_id": repo_id, "tag": tag, "digest": version.digest,
              "url": f"{endpoint()}/{repo_id}/tree/{tag}"}
    with remote_errors(endpoint(), repo_id, None, writing=True):
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        tagged = next((t.target_commit for t in api.list_repo_refs(repo_id).tags if t.name == tag), None)
        if tagged is not None:
            _require_same_files(api, repo_id, tag, files)
            return {**result, "commit": tagged, "created": False}
        stale = [p for p in api.list_repo_files(repo_id) if p not in files and p not in HUB_FILES]
        operations = [CommitOperationDelete(p) for p in stale]
        operations += [CommitOperationAdd(p, str(src)) for p, (src, _sha) in sorted(files.items())]
        operations.append(CommitOperationAdd(CARD, card.encode()))
        commit = api.create_commit(repo_id, operations, commit_message=f"hotswap: {version.ref}",
                                   commit_description=f"content digest {version.digest}")
        api.create_tag(repo_id, tag=tag, revision=commit.oid, tag_message=f"hotswap {version.ref}")
    return {**result, "commit": commit.oid, "created": True}


def _require_same_files(api, repo_id: str, tag: str, files: dict[str, tuple[Path, str]]) -> None:
    from huggingface_hub import RepoFile

    remote = {f.path: f for f in api.list_repo_tree(repo_id, revision=tag, recursive=True)
              if isinstance(f, RepoFile) and f.path not in HUB_FILES}
    differ = sorted(set(remote) ^ set(files))
    for path in sorted(set(remote) & set(files)):
        entry, (local, sha) = remote[path], files[path]
        same = entry.lfs.sha256 == sha if entry.lfs is not None else entry.blob_id == _git_blob_id(local)
        if not same:
            differ.append(path)
    if differ:
        raise RemoteError(f"{repo_id} already has tag {tag} on other files ({', '.join(differ[:5])} differ); "
                          "a published tag is never moved: push to another repo or delete that tag first")


def _git_blob_id(path: Path) -> str:
    """The id git (and the Hub) gives a file stored without LFS."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- pull ----------------------------------------------------------------------------------------
def pull_version(registry: Registry, spec: str, name: str, base: str | None = None,
                 aliases: Iterable[str] = ()) -> PublishResult:
    """Download `org/name[@rev]` and publish it as the next version of `name`.

    The kind comes from the card's hotswap block, else `adapter` when adapter_config.json is there,
    else `model` with `base` given, else `base`. An adapter's base: `base`, else the registry base
    whose source is the card's `base_model`, else the one publish matches from adapter_config.json."""
    repo_id, rev = parse_repo_spec(spec)
    check_identifier(name, "name")  # refuse before downloading anything
    with scratch_folder(registry.home, ".pull-") as tmp:  # removed by gc should this process be killed
        commit = fetch_repo(repo_id, rev, folder := tmp / "files")
        card = _take_card(folder, repo_id)
        saved = card.get("hotswap") if isinstance(card.get("hotswap"), dict) else {}
        kind = saved.get("kind") or ("adapter" if (folder / "adapter_config.json").is_file()
                                     else "model" if base else "base")
        card_base = card.get("base_model")
        card_base = card_base[0] if isinstance(card_base, list) and card_base else card_base
        card_base = card_base if isinstance(card_base, str) else None
        if base is None and kind != "base" and card_base:
            try:
                base = registry.match_base(card_base)
            except NotFoundError:
                base = None  # an adapter may still name a known base in adapter_config.json
        lineage = saved.get("lineage") if isinstance(saved.get("lineage"), dict) else {}
        lineage = {**lineage, "pulled_from": repo_id, "revision": rev or "main", "commit": commit}
        try:
            return registry.publish(
                folder, name=name, kind=kind, base=base, task=saved.get("task"), language=saved.get("language"),
                tags=saved.get("tags"), metrics=saved.get("metrics"), lineage=lineage, aliases=aliases,
                source=(saved.get("source") or card_base or repo_id) if kind == "base" else None)
        except NotFoundError as exc:
            if base is None and card_base:
                raise NotFoundError(f"{exc}; its model card names base_model {card_base!r}, which matches "
                                    "no base in the registry either") from None
            raise


def fetch_repo(repo_id: str, rev: str | None, dest: Path, allow_patterns: list[str] | None = None) -> str:
    """Download the files of `repo_id` at `rev` (those matching `allow_patterns`) as plain files
    into the new folder `dest`; return the commit id they come from. Pickle files are refused
    before any download. Online, nothing is written to the Hugging Face cache."""
    from huggingface_hub import HfApi, constants, snapshot_download

    with remote_errors(endpoint(), repo_id, rev):
        if constants.is_offline_mode():
            return _fetch_cached(repo_id, rev, dest, allow_patterns)
        # Pin the commit first: a branch that moves mid-download cannot mix two revisions' files.
        info = HfApi(endpoint=endpoint()).model_info(repo_id, revision=rev)
        _safe_files(repo_id, rev, [s.rfilename for s in info.siblings or []], allow_patterns)
        bookkeeping = dest / ".cache"  # huggingface_hub's download state, dropped once done
        snapshot_download(repo_id, revision=info.sha, local_dir=dest, cache_dir=bookkeeping / "hub",
                          allow_patterns=allow_patterns, endpoint=endpoint())
        shutil.rmtree(bookkeeping, ignore_errors=True)
        return info.sha


def _fetch_cached(repo_id: str, rev: str | None, dest: Path, allow_patterns: list[str] | None) -> str:
    """Offline: copy the wanted files of the cached commit, only when every one of them is cached.

    A cached snapshot folder may be partial (PeftModel.from_pretrained fetches two files, not the
    card), and a partial copy would publish another version (other digest, no task or metrics), so
    the commit's file list, which snapshot_download caches beside it, must be there and complete."""
    from huggingface_hub import errors, snapshot_download

    def incomplete(why: str) -> RemoteError:
        return RemoteError(f"HF_HUB_OFFLINE is set and {repo_id}@{rev or 'main'} is not completely in the local "
                           f"Hugging Face cache ({why}); pull it without HF_HUB_OFFLINE")

    try:  # LocalEntryNotFoundError (nothing cached) goes on to remote_errors
        cached = Path(snapshot_download(repo_id, revision=rev, allow_patterns=allow_patterns))
    except getattr(errors, "IncompleteSnapshotError", ()):  # raised since huggingface_hub 2.x
        raise incomplete("some of its files are missing") from None
    commit = cached.name  # the cache names each snapshot folder by its commit id
    listed = _cached_file_list(repo_id, commit)
    if listed is None:
        raise incomplete(f"no file list of commit {commit} is cached, so its completeness cannot be checked")
    wanted = _safe_files(repo_id, rev, listed, allow_patterns)
    missing = [path for path in wanted if not (cached / path).is_file()]
    if missing:
        raise incomplete(f"{', '.join(missing[:5])} missing")
    dest.mkdir(parents=True)
    for path in wanted:
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached / path, dest / path)  # follows the cache's links to its blobs
    return commit


def _cached_file_list(repo_id: str, commit: str) -> list[str] | None:
    """Every file of `commit` as huggingface_hub cached its listing; None without one (or before 2.x)."""
    import huggingface_hub

    if not hasattr(huggingface_hub, "get_cached_repo_tree"):
        return None
    try:
        return [entry.path for entry in huggingface_hub.get_cached_repo_tree(repo_id, revision=commit)]
    except huggingface_hub.errors.CachedRepoTreeNotFoundError:
        return None


def _safe_files(repo_id: str, rev: str | None, files: list[str], allow_patterns: list[str] | None) -> list[str]:
    """The files `allow_patterns` selects; refused before any copy when one is a pickle (as publish would),
    or a path that would leave the download's folder (a tampered cache's listing)."""
    from huggingface_hub.utils import filter_repo_objects

    wanted = list(filter_repo_objects(files, allow_patterns=allow_patterns))
    odd = sorted(p for p in wanted if not plain_relative(p))
    if odd:
        raise UnsafeContent(f"{repo_id}@{rev or 'main'} lists paths that leave its folder: {', '.join(map(repr, odd))}")
    pickles = sorted(p for p in wanted if p.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UnsafeContent(f"{repo_id}@{rev or 'main'} holds pickle files ({', '.join(pickles)}), which can "
                            f"run code when loaded; only safetensors weights are accepted: {CONVERT_HINT}")
    return wanted


def _take_card(folder: Path, repo_id: str) -> dict[str, Any]:
    """Drop the Hub-side files, put a version's own README.md back; return the card's front matter."""
    (folder / ".gitattributes").unlink(missing_ok=True)
    meta: dict[str, Any] = {}
    if (folder / CARD).is_file():
        meta = read_card(folder / CARD, repo_id)
        (folder / CARD).unlink()
    original = folder / ORIGINAL_README
    if original.is_file():
        original.replace(folder / CARD)
        if not any(original.parent.iterdir()):
            original.parent.rmdir()
    return meta


__all__ = ["check_repo_id", "endpoint", "fetch_repo", "parse_repo_spec", "pull_version", "push_version"]
