"""Resumable checkpoints: the trainable tensors, optimizer and scheduler state, the loop's
progress (step, losses, early-stopping state) and every RNG the run draws from.

A checkpoint is written to a temporary folder and renamed into place, so a crash mid-write
leaves the previous one intact. It records the recipe digest; resuming under another recipe
is refused, because the data order and schedule would silently differ."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

CHECKPOINT_DIR = "checkpoint"


@dataclass(slots=True)
class LoopState:
    """Everything about the loop's progress that a resumed run must continue from."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "lr"} per step
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", "eval_loss"} per evaluation
    best_eval_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    loop: LoopState, recipe_digest: str) -> Path:
    final = run_dir / CHECKPOINT_DIR
    staging = run_dir / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trainable.items()}, staging / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               staging / "optimizer.pt")
    (staging / "state.json").write_text(json.dumps({"recipe_digest": recipe_digest, "loop": asdict(loop)}, indent=1))
    old = run_dir / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass(slots=True)
class Checkpoint:
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    loop: LoopState


def load_checkpoint(run_dir: Path, recipe_digest: str) -> Checkpoint:
    folder = run_dir / CHECKPOINT_DIR
    if not (folder / "state.json").is_file() and (run_dir / (CHECKPOINT_DIR + ".old") / "state.json").is_file():
        folder = run_dir / (CHECKPOINT_DIR + ".old")  # a save stopped between its two renames: the previous one
    if not (folder / "state.json").is_file():
        raise CheckpointError(f"nothing to resume: {folder} holds no checkpoint")
    try:
        state = json.loads((folder / "state.json").read_text())
        digest = state["recipe_digest"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(folder, exc) from None
    if digest != recipe_digest:
        raise CheckpointError(
            f"{folder} was written by a different recipe or data (digest {digest[:19]}..., now "
            f"{recipe_digest[:19]}...): method, data order and schedule would not match; start afresh without --resume"
        )
    # A damaged file must not pass for a resumable run, nor escape as a traceback (or, for an empty
    # optimizer.pt, as an EOFError the command line reads as Ctrl-D).
    try:
        # Our own file, but still loaded without unpickling arbitrary objects.
        extra = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        return Checkpoint(load_file(folder / "trainable.safetensors"), extra["optimizer"], extra["scheduler"],
                          extra["rng"], LoopState(**state["loop"]))
    except Exception as exc:  # noqa: BLE001 - torch, pickle and safetensors each raise their own kinds
        raise _damaged(folder, exc) from None


def _damaged(folder: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{folder} is damaged ({type(exc).__name__}: {exc}); start afresh without --resume")
