"""One training run from a recipe, start to finish:

  prepare: resolve the base in the registry, read and encode the data, load the base, check the
           target modules (every refusal happens here, before any step is taken)
  train:   seed, make the trainable part, loop (trainer.py), save the result
  score:   the held-out metric of the result (and, on request, of the untouched base)
  record:  metrics.json, lineage.json, history.json and answers.jsonl (base_answers.jsonl) in the run folder

Publishing is a separate step (publish.py) so a run can be inspected before it is stored."""

from __future__ import annotations

import hashlib
import json
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path
from typing import Any

import torch

from hotswap.hub import HubError, Registry, Version

from .checkpoint import LoopState
from .classify import encode_labelled, load_classifier, write_labels
from .data import Example, dataset_digest, read_jsonl
from .encode import Encoded, EncodeStats, encode_all, pad_id_of
from .errors import RecipeError, TrainError
from .evaluate import EvalReport, evaluate
from .metrics import check_references
from .model import Placement, check_targets, count_parameters, folder_size, load_base, make_trainable, save_result
from .recipe import LoadedRecipe
from .trainer import LoopConfig, StepHook, train_loop

ARTIFACT_DIR = "artifact"
RECORD_FILES = ("metrics.json", "lineage.json")


@dataclass(slots=True)
class Prepared:
    """Everything checked and loaded before training starts."""

    loaded: LoadedRecipe
    base: Version
    place: Placement
    model: Any
    tokenizer: Any
    train_examples: list[Example]
    eval_examples: list[Example]
    train_stats: EncodeStats
    eval_stats: EncodeStats
    train_encoded: list[Encoded]
    eval_encoded: list[Encoded]


@dataclass(slots=True)
class RunResult:
    loaded: LoadedRecipe
    method: str
    run_dir: Path
    artifact: Path
    base: Version
    loop: LoopState
    report: EvalReport
    base_report: EvalReport | None
    trainable_params: int
    total_params: int
    wall_s: float
    peak_memory_bytes: int
    size_bytes: int
    metrics: dict[str, float]
    lineage: dict[str, Any]


def prepare(loaded: LoadedRecipe, registry: Registry) -> Prepared:
    recipe = loaded.recipe
    try:
        base = registry.resolve(recipe.base)
        snapshot = registry.open(base)
    except HubError as exc:
        raise RecipeError(f"base {recipe.base!r}: {exc}") from None
    if base.kind != "base":
        raise RecipeError(f"base {recipe.base!r} is {'an' if base.kind == 'adapter' else 'a'} {base.kind}, not a base model")
    train_examples, eval_examples = read_jsonl(loaded.train_path), read_jsonl(loaded.eval_path)
    check_references(recipe.metric, eval_examples, str(loaded.eval_path))
    place = Placement.pick()
    model, tokenizer = load_base(snapshot.path, place.device)
    if recipe.method != "full":
        check_targets(model, recipe.lora.target_modules, base.ref)
    max_length = recipe.train.max_length
    if recipe.classifier:
        del model  # the same weights again, with a classification head instead of lm_head
        torch.manual_seed(recipe.train.seed)  # the new head's initial weights, reproducibly
        model = load_classifier(snapshot.path, recipe.labels, pad_id_of(tokenizer), place.device)
        train_enc, train_stats = encode_labelled(tokenizer, train_examples, recipe.labels, max_length,
                                                 str(loaded.train_path))
        eval_enc, eval_stats = encode_labelled(tokenizer, eval_examples, recipe.labels, max_length, str(loaded.eval_path))
    else:
        train_enc, train_stats = encode_all(tokenizer, train_examples, recipe.system, max_length, str(loaded.train_path))
        eval_enc, eval_stats = encode_all(tokenizer, eval_examples, recipe.system, max_length, str(loaded.eval_path))
    return Prepared(loaded, base, place, model, tokenizer, train_examples, eval_examples,
                    train_stats, eval_stats, train_enc, eval_enc)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def run(prep: Prepared, run_dir: Path, resume: bool = False, eval_base: bool = False,
        on_step: StepHook | None = None, show_progress: bool = True) -> RunResult:
    loaded, recipe = prep.loaded, prep.loaded.recipe
    run_dir.mkdir(parents=True, exist_ok=True)
    source = prep.base.metadata.source
    base_report = evaluate(prep.model, prep.tokenizer, prep.eval_examples, recipe, prep.place) if eval_base else None
    seed_everything(recipe.train.seed)
    model = make_trainable(prep.model, recipe.method, recipe.lora, source, recipe.classifier)
    trainable, total = count_parameters(model)
    lr = recipe.train.full_lr if recipe.method == "full" else recipe.train.lr
    # a checkpoint resumes only the run it was written by: same recipe and same data (the data order
    # a resumed run replays is drawn from them)
    run_key = [loaded.digest, dataset_digest(loaded.train_path, loaded.eval_path)]
    run_digest = "sha256:" + hashlib.sha256(json.dumps(run_key, sort_keys=True).encode()).hexdigest()
    config = LoopConfig(recipe.train, recipe.eval, lr, pad_id_of(prep.tokenizer), run_digest)
    if prep.place.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    loop = train_loop(model, prep.train_encoded, prep.eval_encoded, config, run_dir, prep.place, resume,
                      on_step, show_progress)
    wall_s = time.perf_counter() - started
    peak = _peak_memory(prep.place)
    artifact = run_dir / ARTIFACT_DIR
    shutil.rmtree(artifact, ignore_errors=True)
    save_result(model, prep.tokenizer, recipe.method, artifact, source)
    if recipe.classifier:
        write_labels(artifact, recipe.labels)
    report = evaluate(model, prep.tokenizer, prep.eval_examples, recipe, prep.place)
    report.write_answers(run_dir / "answers.jsonl", prep.eval_examples)
    # the loop hands back the best weights it evaluated, so their held-out loss is the best one
    metrics = {**report.scores, "eval_loss": loop.best_eval_loss}
    if base_report is not None:
        metrics |= {f"base_{k}": v for k, v in base_report.scores.items()}
        base_report.write_answers(run_dir / "base_answers.jsonl", prep.eval_examples)
    result = RunResult(loaded, recipe.method, run_dir, artifact, prep.base, loop, report, base_report,
                       trainable, total, wall_s, peak, folder_size(artifact), metrics, {})
    result.lineage = lineage(prep, result)
    _write_records(result)
    return result


def _peak_memory(place: Placement) -> int:
    if place.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is KiB on Linux, bytes on macOS; the process high-water mark.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def library_versions() -> dict[str, str]:
    found = {}
    for name in ("hotswap", "torch", "transformers", "peft"):
        try:
            found[name] = package_version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


def lineage(prep: Prepared, result: RunResult) -> dict[str, Any]:
    loaded, recipe = prep.loaded, prep.loaded.recipe
    return {
        "recipe": {"name": recipe.name, "digest": loaded.digest, "text": loaded.text,
                   "overrides": list(loaded.overrides), "effective": recipe.model_dump(mode="json")},
        "dataset": {**dataset_digest(loaded.train_path, loaded.eval_path),
                    "num_train": prep.train_stats.num_examples, "num_eval": prep.eval_stats.num_examples},
        "base": {"ref": prep.base.ref, "fingerprint": prep.base.metadata.fingerprint,
                 "source": prep.base.metadata.source},
        "method": recipe.method,
        "seed": recipe.train.seed,
        "steps": result.loop.step,
        "best_step": result.loop.best_step,
        "stopped_early": result.loop.stopped_early,
        "device": prep.place.device.type,
        "libraries": library_versions(),
    }


def _write_records(result: RunResult) -> None:
    out = result.run_dir
    (out / "metrics.json").write_text(json.dumps({
        "metric": result.report.metric, "score": result.report.score,
        "base_score": result.base_report.score if result.base_report else None,
        "metrics": result.metrics, "trainable_params": result.trainable_params,
        "total_params": result.total_params, "wall_s": round(result.wall_s, 1),
        "peak_memory_bytes": result.peak_memory_bytes, "size_bytes": result.size_bytes,
    }, indent=2) + "\n")
    (out / "lineage.json").write_text(json.dumps(result.lineage, indent=2, ensure_ascii=False) + "\n")
    (out / "history.json").write_text(json.dumps(asdict(result.loop), indent=1) + "\n")


def export(result: RunResult, folder: Path) -> Path:
    """Copy the result and its records into `folder` (e.g. the recipe's committed artifact/). An
    earlier export there is replaced whole, so none of its files (another method's weights, say) is
    published with this one; a folder holding anything else is refused. The copy is written beside
    `folder` and swapped in once complete: an export interrupted mid-copy (a full model takes seconds)
    leaves the earlier one in place, not a folder half emptied."""
    check_export(folder)
    staging, aside = folder.with_name(f".{folder.name}.export-new"), folder.with_name(f".{folder.name}.export-old")
    for leftover in (staging, aside):  # of an export killed before
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in sorted(result.artifact.iterdir()):
        shutil.copy2(path, staging / path.name)
    for name in RECORD_FILES:
        shutil.copy2(result.run_dir / name, staging / name)
    if folder.exists():  # an earlier export, or an empty folder
        folder.rename(aside)
    staging.rename(folder)
    shutil.rmtree(aside, ignore_errors=True)
    return folder


def check_export(folder: Path) -> list[Path]:
    """The files of an earlier export in `folder`, to be replaced; refuses a file, or a folder holding
    anything else. The CLI calls it before training too, so a bad --export costs no run."""
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise TrainError(f"--export {folder}: is a file, not a folder")
    entries = list(folder.iterdir())
    earlier = (folder / "lineage.json").is_file() and all(p.is_file() for p in entries)
    if entries and not earlier:
        raise TrainError(f"--export {folder}: holds files that are not an earlier export; give an empty or new folder")
    return entries
