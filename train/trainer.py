"""The training loop: AdamW with linear warm-up and decay, gradient accumulation and clipping,
held-out loss every `eval.every` steps with early stopping (the best weights are restored at
the end), resumable checkpoints, and a progress bar showing the loss.

The order of examples is a pure function of (seed, epoch), so a run resumed at step s sees
exactly the batches the uninterrupted run would have seen from step s on."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import LoopState, load_checkpoint, save_checkpoint, set_rng_state
from .encode import IGNORE_INDEX, Encoded, collate
from .model import Placement, load_trainable_state, trainable_state
from .recipe import EvalSettings, TrainSettings

BEST_FILE = "best.safetensors"
StepHook = Callable[[LoopState], None]


@dataclass(frozen=True, slots=True)
class LoopConfig:
    train: TrainSettings
    eval: EvalSettings
    lr: float  # the method's learning rate (adapter or full)
    pad_id: int
    recipe_digest: str


def total_micro_batches(settings: TrainSettings, num_examples: int) -> int:
    """Micro-batches of the run: ``max_steps`` whole steps, else ``epochs`` passes over the data
    (counted in micro-batches, as ``micro_batch`` walks the epochs, so grad_accum > 1 adds none)."""
    if settings.max_steps:
        return settings.max_steps * settings.grad_accum
    return max(1, math.ceil(settings.epochs * math.ceil(num_examples / settings.batch_size)))


def total_steps(settings: TrainSettings, num_examples: int) -> int:
    """Optimizer steps; the last one may take fewer than grad_accum micro-batches."""
    return math.ceil(total_micro_batches(settings, num_examples) / settings.grad_accum)


def micro_batch(data: list[Encoded], settings: TrainSettings, index: int) -> list[Encoded]:
    """The index-th micro-batch of the run: epochs are seeded shuffles, the last batch may be short."""
    per_epoch = math.ceil(len(data) / settings.batch_size)
    epoch, position = divmod(index, per_epoch)
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
    order = torch.randperm(len(data), generator=generator).tolist()
    picked = order[position * settings.batch_size:(position + 1) * settings.batch_size]
    return [data[i] for i in picked]


def _schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def evaluate_loss(model: nn.Module, data: list[Encoded], batch_size: int, pad_id: int, place: Placement) -> float:
    """Mean loss per answer token over the held-out set (a classifier's: per example)."""
    was_training = model.training
    model.eval()
    loss_sum, items = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = {k: v.to(place.device) for k, v in collate(data[start:start + batch_size], pad_id).items()}
            loss_sum += summed_loss(model, batch, place).item()
            items += num_items(batch)
    model.train(was_training)
    return loss_sum / max(1, items)


def num_items(batch: dict[str, torch.Tensor]) -> int:
    """What a batch's loss is summed over: its answer tokens that a position predicts (a classifier's
    batch: its examples)."""
    labels = batch["labels"]
    return len(labels) if labels.ndim == 1 else int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor], place: Placement) -> torch.Tensor:
    """Cross-entropy summed over the batch's ``num_items``, so that micro-batches of one step add up
    to exactly the loss of one large batch (a mean per micro-batch would weight a token by how few
    answer tokens its micro-batch has).

    Logits are computed only where the next token is part of an answer: over a 49k vocabulary the
    full [B, T, V] logits would dominate the run's peak memory."""
    labels = batch["labels"]
    if labels.ndim == 1:  # a classifier: one class per example, logits [B, C]
        with place.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
    targets = labels[:, 1:]  # [B, T-1]: the token each position predicts
    keep = nn.functional.pad(targets != IGNORE_INDEX, (0, 1))  # [B, T] positions whose next token is labelled
    with place.autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=keep).logits  # [N, V], one row per answer token
    return nn.functional.cross_entropy(logits.float(), targets[keep[:, :-1]], reduction="sum")


def train_loop(model: nn.Module, train: list[Encoded], held_out: list[Encoded], config: LoopConfig,
               run_dir: Path, place: Placement, resume: bool = False, on_step: StepHook | None = None,
               show_progress: bool = True) -> LoopState:
    settings = config.train
    micro_batches = total_micro_batches(settings, len(train))
    steps = total_steps(settings, len(train))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings.warmup_steps, steps))
    loop = LoopState()
    if resume:
        saved = load_checkpoint(run_dir, config.recipe_digest)
        load_trainable_state(model, saved.trainable)
        optimizer.load_state_dict(saved.optimizer)
        scheduler.load_state_dict(saved.scheduler)
        set_rng_state(saved.rng)
        loop = saved.loop
    model.train()
    bar = tqdm(total=steps, initial=loop.step, desc="train", unit="step", disable=not show_progress, dynamic_ncols=True)
    while loop.step < steps and not loop.stopped_early:
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler then moves it on)
        count = min(settings.grad_accum, micro_batches - loop.step * settings.grad_accum)
        loss = _optimizer_step(model, train, settings, loop.step, count, params, optimizer, config.pad_id, place)
        scheduler.step()
        loop.step += 1
        loop.history.append({"step": loop.step, "loss": loss, "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if config.eval.every and loop.step % config.eval.every == 0 and loop.step < steps:
            _evaluate(model, held_out, config, loop, run_dir, place, bar, last=False)
        if settings.checkpoint_every and loop.step % settings.checkpoint_every == 0:
            save_checkpoint(run_dir, trainable_state(model), optimizer, scheduler, loop, config.recipe_digest)
        if on_step is not None:
            on_step(loop)
    if not loop.evals or loop.evals[-1]["step"] != loop.step:
        _evaluate(model, held_out, config, loop, run_dir, place, bar, last=True)
    bar.close()
    save_checkpoint(run_dir, trainable_state(model), optimizer, scheduler, loop, config.recipe_digest)
    if loop.best_step is not None and loop.best_step != loop.step and (run_dir / BEST_FILE).is_file():
        load_trainable_state(model, load_file(run_dir / BEST_FILE))  # early stopping keeps the best weights
    return loop


def _optimizer_step(model, train, settings: TrainSettings, step: int, count: int, params, optimizer, pad_id: int,
                    place: Placement) -> float:
    """One optimizer step over ``count`` micro-batches (grad_accum, or fewer for an epoch's end): the
    gradient of the mean loss over all their answer tokens, as one batch of them all would give."""
    optimizer.zero_grad(set_to_none=True)
    batches = [{name: t.to(place.device) for name, t in
                collate(micro_batch(train, settings, step * settings.grad_accum + k), pad_id).items()}
               for k in range(count)]
    items = max(1, sum(num_items(batch) for batch in batches))
    total = 0.0
    for batch in batches:
        loss = summed_loss(model, batch, place) / items
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    optimizer.step()
    return total


def _evaluate(model, held_out, config: LoopConfig, loop: LoopState, run_dir: Path, place: Placement, bar,
              last: bool) -> None:
    """Measure the held-out loss; keep the best weights; stop early after ``patience`` evaluations
    without improvement (not at the run's last one: every step has run then)."""
    eval_loss = evaluate_loss(model, held_out, config.eval.batch_size, config.pad_id, place)
    loop.evals.append({"step": loop.step, "eval_loss": eval_loss})
    bar.write(f"step {loop.step}: held-out loss {eval_loss:.4f}", file=sys.stderr)
    if loop.best_eval_loss is None or eval_loss < loop.best_eval_loss - config.eval.min_delta:
        loop.best_eval_loss, loop.best_step, loop.bad_evals = eval_loss, loop.step, 0
        if config.eval.every:  # only periodic evaluation can pick an earlier step than the last
            save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, run_dir / BEST_FILE)
        return
    loop.bad_evals += 1
    if config.eval.patience and loop.bad_evals >= config.eval.patience and not last:
        loop.stopped_early = True
        bar.write(f"early stop at step {loop.step}: no improvement in {loop.bad_evals} evaluations "
                  f"(best {loop.best_eval_loss:.4f} at step {loop.best_step})", file=sys.stderr)
