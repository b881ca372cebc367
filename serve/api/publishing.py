"""Publishing an uploaded adapter and moving aliases: the registry work behind the hub endpoints.

An upload is written file by file into a private temporary folder (flat names only: a PEFT adapter
folder has no sub-folders), then handed to `Registry.publish`, which runs the safety and
compatibility checks. Nothing is stored unless every check passes.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from litestar.datastructures import UploadFile
from litestar.params import KwargDefinition

from hotswap.hub import HubError, InvalidMetadata, InvalidName, Registry, check_alias, check_identifier

from .admin_schemas import AliasInfo, EntryInfo, PublishResponse
from .exceptions import BadReference, BadUpload
from .openai_schemas import NAME_PATTERN, REF_PATTERN
from .services import Services

_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _doc(description: str, **schema) -> KwargDefinition:
    """Schema-only description of a form field; the registry validates the values with clear messages."""
    return KwargDefinition(description=description, **schema)


_ALIASES = r"^\s*(?!latest\b)[a-z0-9][a-z0-9._-]{0,63}(\s*,\s*(?!latest\b)[a-z0-9][a-z0-9._-]{0,63})*\s*$"


@dataclass
class PublishForm:
    """multipart/form-data of POST /v1/hub/publish."""

    name: Annotated[str, _doc("Entry name; the next version is created.", max_length=64, pattern=NAME_PATTERN)]
    files: Annotated[list[UploadFile], _doc(
        "The adapter's files, each under its own name: adapter_config.json and adapter_model.safetensors "
        "(a README.md too if you like).", min_items=1)]
    base: Annotated[str | None, _doc("Base ref; default: the base this server runs.", pattern=REF_PATTERN)] = None
    task: Annotated[str | None, _doc("What it was trained for, e.g. text-to-sql.", max_length=200)] = None
    language: Annotated[str | None, _doc("BCP-47 tag, e.g. en, pt-BR.", pattern=r"^[a-zA-Z]{2,3}(-[a-zA-Z0-9]{2,8})*$")] = None
    aliases: Annotated[str | None, _doc("Comma-separated aliases to point at the new version.", pattern=_ALIASES)] = None
    tags: Annotated[str | None, _doc('JSON object of strings, e.g. {"team": "a"}.')] = None
    metrics: Annotated[str | None, _doc('JSON object of numbers, e.g. {"exact_match": 0.9}.')] = None


def _json_object(text: str | None, field_name: str, value_types: tuple[type, ...], what: str) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadUpload(f"{field_name} is not valid JSON: {exc}", field_name) from None
    if not isinstance(value, dict) or not all(isinstance(v, value_types) and not isinstance(v, bool)
                                              and (not isinstance(v, float) or math.isfinite(v)) for v in value.values()):
        raise BadUpload(f"{field_name} must be a JSON object of {what}", field_name)
    return value


def _checked_names(files: list[UploadFile]) -> list[str]:
    names = [f.filename or "" for f in files]
    for name in names:
        if not _FILE_NAME.fullmatch(name) or ".." in name:
            raise BadUpload(f"file name {name!r} is not a plain file name (letters, digits, '.', '_', '-'; "
                            "no folders): upload the adapter folder's files under their own names")
    if len(set(names)) != len(names):
        raise BadUpload(f"two uploaded files share a name: {', '.join(sorted(names))}")
    return names


async def publish_upload(form: PublishForm, services: Services) -> PublishResponse:
    names = _checked_names(form.files)
    tags = _json_object(form.tags, "tags", (str,), "strings")
    metrics = _json_object(form.metrics, "metrics", (int, float), "finite numbers")
    aliases = tuple(a.strip() for a in (form.aliases or "").split(",") if a.strip())
    if "latest" in aliases:  # publish moves latest itself; naming it could move it back to old content
        raise BadUpload("aliases may not name 'latest': publishing moves it to the new version", "aliases")
    try:  # the registry would refuse them too, without saying which form field held them
        check_identifier(form.name, "name")
    except InvalidName as exc:
        raise BadReference(str(exc), "name") from None
    for alias in aliases:
        try:
            check_alias(alias)
        except InvalidName as exc:
            raise BadReference(str(exc), "aliases") from None
    if form.task is not None and len(form.task) > 200:
        raise BadUpload(f"task is {len(form.task)} characters; at most 200", "task")
    base = form.base or services.engine.base.ref

    def store(reg: Registry) -> PublishResponse:
        try:
            reg.resolve(base)
        except HubError as exc:  # an unknown or malformed base: the form field is named
            exc.param = "base"
            raise
        with tempfile.TemporaryDirectory(prefix="hotswap-upload-") as tmp:
            for name, upload in zip(names, form.files):
                upload.file.seek(0)
                with open(Path(tmp) / name, "wb") as out:
                    shutil.copyfileobj(upload.file, out, 1 << 20)
            try:
                result = reg.publish(tmp, name=form.name, kind="adapter", base=base, task=form.task,
                                     language=form.language, tags=tags, metrics=metrics, aliases=aliases)
            except InvalidMetadata as exc:  # a malformed language tag, say: the form field that held it
                if exc.field in ("task", "language", "tags", "metrics"):
                    exc.param = exc.field
                raise
        v = result.version
        pointing = sorted(a for a, n in reg.aliases(v.name).items() if n == v.version)
        return PublishResponse(ref=v.ref, name=v.name, version=v.version, digest=v.digest, created=result.created,
                               aliases=pointing, base=v.metadata.base, rank=v.metadata.rank,
                               target_modules=list(v.metadata.target_modules))

    try:
        return await services.hub.run(store)
    finally:
        for upload in form.files:
            await upload.close()


def entry_info(reg: Registry, name: str) -> EntryInfo:
    versions = reg.versions(name)
    history = [AliasInfo(name=e.name, alias=e.alias, version=e.to_version, previous=e.from_version, at=e.at)
               for e in reg.alias_history(name)]
    return EntryInfo(name=name, kind=versions[0].kind, versions=[v.version for v in versions],
                     aliases=reg.aliases(name), history=history)


def alias_info(reg: Registry, name: str, alias: str, version: int) -> AliasInfo:
    previous = reg.aliases(name).get(alias) if reg.versions(name) else None
    moved = reg.alias(f"{name}@{version}", alias)
    return AliasInfo(name=name, alias=alias, version=moved.version, previous=previous)


def remove_alias(reg: Registry, name: str, alias: str) -> AliasInfo:
    previous = reg.aliases(name).get(alias)
    reg.unalias(name, alias)
    return AliasInfo(name=name, alias=alias, version=None, previous=previous)
