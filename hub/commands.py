"""`hotswap hub ...`: the registry's commands. Each takes `--home`; those a script would read
take `--json`. Refusals raise `HubError`, which the root command turns into exit 1 + stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .compat import classifier_label_names
from .errors import HubError, InvalidMetadata
from .registry import Registry
from .versions import Version

app = typer.Typer(help="The adapter registry: bases, adapters and full models, versioned.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

HomeOption = typer.Option(None, "--home", envvar="HOTSWAP_HOME", help="Registry folder ($HOTSWAP_HOME).")
JsonOption = typer.Option(False, "--json", help="Print JSON for scripts.")
RefArgument = typer.Argument(..., metavar="REF", help="A reference: name (its latest), name@3 or name@alias.")
NameArgument = typer.Argument(..., metavar="NAME", help="Entry name.")
AliasArgument = typer.Argument(..., metavar="ALIAS", help="Alias name, e.g. prod (not all digits).")


def version_dict(version: Version, aliases: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "ref": version.ref, "name": version.name, "version": version.version, "kind": version.kind,
        "digest": version.digest, "created_at": version.created_at.isoformat(),
        "aliases": sorted(a for a, v in (aliases or {}).items() if v == version.version),
        "metadata": version.metadata.model_dump(mode="json"),
    }


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidMetadata(f"{what} {item!r} must look like KEY=VALUE")
        out[key] = value
    return out


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


@app.command("import-base")
def import_base_cmd(
    name: str = typer.Argument(..., metavar="NAME", help="Registry name for the base, e.g. smollm2."),
    source: Optional[str] = typer.Argument(None, metavar="SOURCE", help="HF-format folder, GGUF file or Hub repo id; "
                                           "none imports the embedded SmolLM2-135M-Instruct (name smollm2)."),
    source_id: Optional[str] = typer.Option(None, help="Hub id adapters name this base by (base_model_name_or_path)."),
    alias: list[str] = typer.Option([], "--alias", help="Also point these aliases at it."),
    home: Optional[Path] = HomeOption, as_json: bool = JsonOption,
) -> None:
    """Import a base model (dequantizing GGUF to safetensors)."""
    from .importers import import_base

    result = import_base(Registry(home), name, source, source_id, tuple(alias))
    _report_publish(result, as_json)


@app.command()
def publish(
    folder: Path = typer.Argument(..., metavar="DIR", help="A PEFT adapter folder (adapter_config.json + "
                                  "adapter_model.safetensors) or, with --kind model/base, a checkpoint folder."),
    name: str = typer.Option(..., "--name", help="Entry name: lower-case identifier."),
    kind: str = typer.Option("adapter", "--kind", help="adapter, model or base."),
    base: Optional[str] = typer.Option(None, "--base", help="Base reference; default: matched from the adapter's "
                                       "base_model_name_or_path."),
    task: Optional[str] = typer.Option(None, "--task", help="What it was trained for, e.g. text-to-sql."),
    language: Optional[str] = typer.Option(None, "--language", help="BCP-47 tag, e.g. en or pt-BR."),
    tag: list[str] = typer.Option([], "--tag", help="KEY=VALUE, repeatable."),
    metric: list[str] = typer.Option([], "--metric", help="NAME=NUMBER, repeatable."),
    alias: list[str] = typer.Option([], "--alias", help="Also point these aliases at the new version."),
    home: Optional[Path] = HomeOption, as_json: bool = JsonOption,
) -> None:
    """Publish a folder as the next version of NAME; prints name@version."""
    try:
        metrics = {k: float(v) for k, v in _pairs(metric, "--metric").items()}
    except ValueError:
        raise InvalidMetadata(f"--metric values must be numbers: {metric}") from None
    result = Registry(home).publish(folder, name=name, kind=kind, base=base, task=task, language=language,
                                    tags=_pairs(tag, "--tag"), metrics=metrics, aliases=alias)
    _report_publish(result, as_json)


def _report_publish(result, as_json: bool) -> None:
    if as_json:
        _echo_json({"created": result.created, **version_dict(result.version)})
    elif result.created:
        typer.echo(result.version.ref)
    else:
        typer.echo(f"{result.version.ref} (unchanged: identical content is already stored as this version)")


@app.command("list")
def list_cmd(
    kind: Optional[str] = typer.Option(None, "--kind", help="Only this kind: base, adapter or model."),
    task: Optional[str] = typer.Option(None, "--task", help="Only this task."),
    language: Optional[str] = typer.Option(None, "--language", help="Only this language (BCP-47 tag)."),
    base: Optional[str] = typer.Option(None, "--base", help="Only adapters and models of this base (a reference)."),
    tag: Optional[str] = typer.Option(None, "--tag", help="Only versions with this tag: KEY, or KEY=VALUE."),
    home: Optional[Path] = HomeOption, as_json: bool = JsonOption,
) -> None:
    """List versions, filtered by kind, task, language, base and tag."""
    registry = Registry(home)
    versions = registry.list(kind=kind, task=task, language=language, base=base, tag=tag)
    aliases = {name: registry.aliases(name) for name in {v.name for v in versions}}
    if as_json:
        _echo_json([version_dict(v, aliases[v.name]) for v in versions])
        return
    from rich.console import Console
    from rich.table import Table

    header = ("ref", "kind", "aliases", "task", "language", "base", "rank", "size", "created")
    rows = [(v.ref, v.kind, ",".join(sorted(a for a, n in aliases[v.name].items() if n == v.version)),
             v.metadata.task or "", v.metadata.language or "", v.metadata.base or "", str(v.metadata.rank or ""),
             _size(v.metadata.size_bytes), v.created_at.strftime("%Y-%m-%d %H:%M")) for v in versions]
    if not sys.stdout.isatty():  # a pipe or a log: whole values, tab-separated (a table there is cut to 80 columns)
        for row in (header, *rows):
            typer.echo("\t".join(row))
        return
    table = Table(*header)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@app.command()
def show(ref: str = RefArgument, home: Optional[Path] = HomeOption, as_json: bool = JsonOption) -> None:
    """Everything about one version: metadata, lineage, files and aliases."""
    registry = Registry(home)
    version = registry.resolve(ref)
    info = version_dict(version, registry.aliases(version.name))
    info["files"] = [{"path": p, "sha256": s, "size": n} for p, s, n in registry.files(version)]
    if version.kind != "base":
        info["labels"] = classifier_label_names(registry.open(version).path)  # None: not a classifier
    if as_json:
        _echo_json(info)
        return
    for key in ("ref", "kind", "digest", "created_at", "aliases"):
        typer.echo(f"{key}: {info[key]}")
    for key, value in info["metadata"].items():
        if value not in (None, [], {}, 0) and key not in ("kind", "created_at"):  # both printed above
            typer.echo(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if info.get("labels"):
        typer.echo(f"classifier labels: {', '.join(info['labels'])}")
    typer.echo("files:")
    for f in info["files"]:
        typer.echo(f"  {f['path']}  {_size(f['size'])}  sha256:{f['sha256'][:16]}")


@app.command()
def alias(ref: str = RefArgument, alias_name: str = AliasArgument,
          home: Optional[Path] = HomeOption, as_json: bool = JsonOption) -> None:
    """Point ALIAS (prod, staging, ...) at REF; the move is recorded."""
    version = Registry(home).alias(ref, alias_name)
    _echo_json({"alias": f"{version.name}@{alias_name}", "ref": version.ref}) if as_json \
        else typer.echo(f"{version.name}@{alias_name} -> {version.ref}")


@app.command()
def unalias(name: str = NameArgument, alias_name: str = AliasArgument,
            home: Optional[Path] = HomeOption) -> None:
    """Remove an alias (recorded in the history)."""
    Registry(home).unalias(name, alias_name)
    typer.echo(f"removed {name}@{alias_name}")


@app.command()
def rollback(name: str = NameArgument, alias_name: str = AliasArgument,
             home: Optional[Path] = HomeOption) -> None:
    """Move ALIAS back to the version it pointed at before its last move."""
    version = Registry(home).rollback(name, alias_name)
    typer.echo(f"{name}@{alias_name} -> {version.ref}")


@app.command()
def aliases(name: str = NameArgument, home: Optional[Path] = HomeOption, as_json: bool = JsonOption) -> None:
    """Current aliases of NAME and the history of every move (when, from, to)."""
    registry = Registry(home)
    registry.versions(name)  # refuses an unknown name with the nearest ones
    current, history = registry.aliases(name), registry.alias_history(name)
    if as_json:
        _echo_json({"aliases": current, "history": [
            {"alias": e.alias, "from": e.from_version, "to": e.to_version, "at": e.at} for e in history]})
        return
    for name_, number in current.items():
        typer.echo(f"{name}@{name_} -> {name}@{number}")
    typer.echo("history:")
    for e in history:
        typer.echo(f"  {e.at}  {e.alias}: {e.from_version or '-'} -> {e.to_version or '-'}")


@app.command()
def verify(ref: Optional[str] = typer.Argument(None, metavar="REF", help="One version; default: every version."),
           home: Optional[Path] = HomeOption,
           as_json: bool = JsonOption) -> None:
    """Re-hash stored files (of REF, or of everything) and report corruption (exit 1)."""
    problems = Registry(home).verify(ref)
    if as_json:
        _echo_json([{"ref": p.ref, "path": p.path, "message": p.message} for p in problems])
    for p in problems:
        typer.echo(f"CORRUPT {p.ref} {p.path}: {p.message}", err=True)
    if problems:
        raise typer.Exit(1)
    if not as_json:
        typer.echo("ok: every stored file matches its digest")


@app.command()
def rm(ref: str = RefArgument,
       force: bool = typer.Option(False, "--force", help="Remove even if aliases or entries point at it."),
       home: Optional[Path] = HomeOption) -> None:
    """Remove a version (refused while an alias or a dependent entry points at it, unless --force)."""
    version = Registry(home).remove(ref, force=force)
    typer.echo(f"removed {version.ref} (run `hotswap hub gc` to free its files)")


@app.command()
def gc(home: Optional[Path] = HomeOption, as_json: bool = JsonOption) -> None:
    """Delete stored files that no version references, and downloads that killed pulls and imports left."""
    count, freed = Registry(home).gc()
    _echo_json({"files": count, "bytes": freed}) if as_json else typer.echo(f"removed {count} files, {_size(freed)}")


@app.command()
def push(ref: str = RefArgument, repo_id: str = typer.Option(..., "--repo-id", help="ORG/NAME on the Hub."),
         private: bool = typer.Option(False, "--private", help="Create the Hub repo as private (an existing repo "
                                      "keeps its visibility)."),
         home: Optional[Path] = HomeOption, as_json: bool = JsonOption) -> None:
    """Upload a version with a generated model card; the commit is tagged with the version."""
    from .remote import push_version

    result = push_version(Registry(home), ref, repo_id, private=private)
    if as_json:
        _echo_json(result)
    elif result.get("created", True):
        typer.echo(f"pushed {result['ref']} to {repo_id} (tag {result['tag']})")
    else:
        typer.echo(f"{result['ref']} is already on {repo_id} at tag {result['tag']}; nothing uploaded")


@app.command()
def pull(repo: str = typer.Argument(..., metavar="ORG/NAME[@REV]", help="Hub repo id, optionally @ a branch, "
                                     "tag or commit."),
         name: str = typer.Option(..., "--name", help="Local entry name: lower-case identifier."),
         base: Optional[str] = typer.Option(None, "--base", help="Base reference; default: matched from the "
                                            "adapter's base_model_name_or_path."),
         alias: list[str] = typer.Option([], "--alias", help="Also point these aliases at the new version."),
         home: Optional[Path] = HomeOption, as_json: bool = JsonOption) -> None:
    """Download a Hub repo and publish it as a new local version (same checks as publish)."""
    from .remote import pull_version

    _report_publish(pull_version(Registry(home), repo, name, base=base, aliases=tuple(alias)), as_json)


__all__ = ["app", "HubError"]
