"""`hotswap train`: train a recipe (the default command), score, publish, compare, merge.

`hotswap train RECIPE ...` runs `hotswap train run RECIPE ...`: the group falls back to `run`
when the first word is not one of its sub-commands. Every refusal prints its reason on stderr
and exits with status 1."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

DEFAULT_COMMAND = "run"


class _DefaultToRun(TyperGroup):
    """A group whose first word, when it is not a sub-command, is the recipe of `run`."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return DEFAULT_COMMAND, self.commands[DEFAULT_COMMAND], args
        return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=_DefaultToRun, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="Train adapters and full fine-tunes from recipes. `hotswap train RECIPE [OPTIONS]` is short for "
         "`hotswap train run RECIPE [OPTIONS]`; RECIPE is a recipe.toml or the folder holding it.",
)

HomeOption = typer.Option(None, "--home", help="Registry folder (default: $HOTSWAP_HOME or the per-user one).")
JsonOption = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
SetOption = typer.Option([], "--set", help="Override a recipe field, KEY=VALUE (e.g. train.lr=2e-4); repeatable.")
AliasOption = typer.Option([], "--alias", help="Also point this alias at the published version; repeatable.")


@contextmanager
def _refusals() -> Iterator[None]:
    from hotswap.hub import HubError

    from .errors import TrainError

    try:
        yield
    except (TrainError, HubError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # a path the system refused (a file where a folder goes, a full disk): say which
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None


def _writable_file(path: Path, option: str) -> None:
    from .errors import TrainError

    if path.is_dir():
        raise TrainError(f"{option}: {path} is a folder, not a file")
    _writable_folder(path.parent, option)


def _writable_folder(folder: Path, option: str) -> None:
    from .errors import TrainError

    if folder.exists() and not folder.is_dir():
        raise TrainError(f"{option}: {folder} is a file, not a folder")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        raise TrainError(f"{option}: {existing} is not writable")


def _emit(payload: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False, default=str))
    else:
        for line in lines:
            typer.echo(line)


def _registry(home: Optional[Path]):
    from hotswap.hub import Registry

    return Registry(home)


@app.command(DEFAULT_COMMAND)
def run_cmd(
    recipe: str = typer.Argument(..., metavar="RECIPE", help="recipe.toml, or the folder holding it"),
    method: Optional[str] = typer.Option(None, "--method", help="lora, dora or full (default: the recipe's)."),
    publish: bool = typer.Option(False, "--publish", help="Store the result in the registry (moves `latest`)."),
    overrides: list[str] = SetOption,
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/<name>-<method>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's checkpoint."),
    eval_base: bool = typer.Option(False, "--eval-base", help="Also score the untrained base on the held-out set."),
    export: Optional[Path] = typer.Option(None, "--export", help="Copy the result, metrics.json and lineage.json here."),
    name: Optional[str] = typer.Option(None, "--name", help="Registry name (default: the recipe's; <name>-full for full)."),
    aliases: list[str] = AliasOption,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train RECIPE with LoRA, DoRA or full fine-tuning; score it on the held-out set; optionally publish."""
    with _refusals():
        from hotswap.hub import check_alias, check_identifier

        from .publish import entry_name, publish_result
        from .recipe import METHODS, load_recipe
        from .run import export as export_run
        from .run import check_export, prepare, run

        if method is not None and method not in METHODS:
            raise typer.BadParameter(f"{method!r} is not one of {', '.join(METHODS)}", param_hint="--method")
        loaded = load_recipe(recipe, overrides, method=method)
        if publish:  # refused now, not after the training run
            check_identifier(entry_name(loaded, loaded.recipe.method, name), "name")
            for alias in aliases:
                check_alias(alias)
        run_dir = out or Path("runs") / f"{loaded.recipe.name}-{loaded.recipe.method}"
        _writable_folder(run_dir, "--out")
        if export is not None:  # refused now, not after the training run
            check_export(export)
            _writable_folder(export, "--export")
        registry = _registry(home)
        prep = prepare(loaded, registry)  # every refusal about base, data and modules happens here
        result = run(prep, run_dir, resume=resume, eval_base=eval_base, show_progress=not quiet)
        payload: dict[str, Any] = {
            "recipe": loaded.recipe.name, "method": result.method, "run_dir": str(run_dir),
            "steps": result.loop.step, "metric": result.report.metric, "metrics": result.metrics,
            "trainable_params": result.trainable_params, "wall_s": round(result.wall_s, 1),
        }
        lines = [f"{loaded.recipe.name} ({result.method}): {result.loop.step} steps in {result.wall_s:.0f} s; "
                 f"held-out {result.report.metric} {result.report.score:.3f}"
                 + (f" (base {result.base_report.score:.3f})" if result.base_report else ""),
                 f"run folder: {run_dir}"]
        if export is not None:
            payload["exported"] = str(export_run(result, export))
            lines.append(f"exported to {export}")
        if publish:
            published = publish_result(registry, result, name, tuple(aliases))
            payload["published"] = published.version.ref
            lines.append(f"published {published.version.ref}" + ("" if published.created else " (identical content existed)"))
        _emit(payload, as_json, lines)


@app.command("eval")
def eval_cmd(
    recipe: str = typer.Argument(..., metavar="RECIPE", help="recipe.toml, or the folder holding it"),
    ref: Optional[str] = typer.Option(None, "--ref", help="Registry entry to score (adapter or model; default: the base)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Adapter folder to score instead (e.g. artifact/)."),
    overrides: list[str] = SetOption,
    answers: Optional[Path] = typer.Option(None, "--answers", help="Write each answer to this JSONL file."),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Score the base, a registry entry or an adapter folder on RECIPE's held-out set with its metric."""
    with _refusals():
        from .recipe import load_recipe
        from .scoring import score_target

        loaded = load_recipe(recipe, overrides)
        if answers is not None:  # refused before the evaluation, not after it
            _writable_file(answers, "--answers")
        target, report, examples = score_target(loaded, _registry(home), ref, adapter)
        if answers is not None:
            report.write_answers(answers, examples)
        _emit({"recipe": loaded.recipe.name, "target": target, "metric": report.metric, "scores": report.scores},
              as_json, [f"{target} on {loaded.recipe.name} held-out: " +
                        ", ".join(f"{k} {v:.3f}" for k, v in report.scores.items())])


@app.command("publish")
def publish_cmd(
    recipe: str = typer.Argument(..., metavar="RECIPE", help="recipe.toml, or the folder holding it"),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help="Exported result (default: RECIPE's artifact/)."),
    name: Optional[str] = typer.Option(None, "--name", help="Registry name (default: the recipe's)."),
    aliases: list[str] = AliasOption,
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Publish an exported result, such as a shipped recipe's committed artifact, without retraining."""
    with _refusals():
        from .publish import publish_artifact
        from .recipe import load_recipe

        loaded = load_recipe(recipe)
        folder = artifact or loaded.folder / "artifact"
        published = publish_artifact(_registry(home), loaded, folder, name, tuple(aliases))
        _emit({"published": published.version.ref, "created": published.created}, as_json,
              [f"published {published.version.ref}" + ("" if published.created else " (identical content existed)")])


@app.command("compare")
def compare_cmd(
    recipe: str = typer.Argument(..., metavar="RECIPE", help="recipe.toml, or the folder holding it"),
    overrides: list[str] = SetOption,
    home: Optional[Path] = HomeOption,
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: runs/<name>-compare)."),
    work: Optional[Path] = typer.Option(None, "--work", help="Run folders, checkpoints included "
                                        "(default: runs/<name>-compare/runs)."),
    as_json: bool = JsonOption,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train RECIPE as LoRA and as a full fine-tune; write a Markdown report and a PNG of the loss curves."""
    with _refusals():
        from dataclasses import asdict

        from .compare import compare
        from .machine import describe_machine
        from .recipe import load_recipe
        from .report import write_report

        loaded = load_recipe(recipe, overrides)
        out_dir = out or Path("runs") / f"{loaded.recipe.name}-compare"
        work_dir = work or Path("runs") / f"{loaded.recipe.name}-compare" / "runs"
        _writable_folder(out_dir, "--out")  # refused now, not after both training runs
        _writable_folder(work_dir, "--work")
        command = "hotswap train compare " + " ".join(
            [str(recipe)] + [f"--set {o}" for o in overrides])
        runs, base_score = compare(recipe, tuple(overrides), str(home) if home else None, work_dir,
                                   show_progress=not quiet)
        report = write_report(runs, base_score, loaded.recipe.name, out_dir, command, describe_machine(runs[0].device))
        _emit({"report": str(report), "base_score": base_score,
               "runs": [{k: v for k, v in asdict(r).items() if k not in ("history", "evals")} for r in runs]},
              as_json, [report.read_text(), f"report: {report}"])


@app.command("merge")
def merge_cmd(
    refs: list[str] = typer.Argument(..., metavar="REF", help="Adapters to combine (registry references, two or more)."),
    weights: list[str] = typer.Option(..., "--weights", help="One weight per adapter: '0.5,0.5' or repeated."),
    method: str = typer.Option("linear", "--method", help="linear, ties, dare_linear or cat."),
    name: str = typer.Option(..., "--name", help="Registry name of the merged adapter."),
    density: Optional[float] = typer.Option(None, "--density", help="ties/dare_linear: fraction kept (default 0.5)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed for dare_linear's random pruning."),
    aliases: list[str] = AliasOption,
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Combine adapters of one base into a new adapter (PEFT add_weighted_adapter).

    Federated averaging: adapters trained at separate sites on the same recipe merge with weights
    n_i/N; `--method cat` gives exactly the weighted average of their weight updates."""
    with _refusals():
        from hotswap.hub import check_alias, check_identifier

        from .merge import merge_adapters

        check_identifier(name, "name")  # refused now, not after the adapters are loaded and merged
        for alias in aliases:
            check_alias(alias)
        try:
            values = [float(w) for item in weights for w in item.split(",") if w.strip()]
        except ValueError:
            raise typer.BadParameter(f"weights must be numbers, got {' '.join(weights)!r}", param_hint="--weights")
        published = merge_adapters(_registry(home), refs, values, method, name, density, seed, tuple(aliases))
        _emit({"published": published.version.ref, "created": published.created, "method": method,
               "weights": values}, as_json, [f"published {published.version.ref} ({method} of {', '.join(refs)})"])


def main() -> None:  # `python -m hotswap.train`
    app(prog_name="hotswap train")


if __name__ == "__main__":
    sys.exit(main())
