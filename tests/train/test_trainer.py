"""The training loop on a tiny random Llama: the loss falls, runs are deterministic, a resumed
run continues exactly where the checkpoint left off, and early stopping stops."""

from __future__ import annotations

import pytest
import torch

from hotswap.train.errors import CheckpointError
from hotswap.train.model import trainable_state
from hotswap.train.recipe import load_recipe
from hotswap.train.run import prepare, run
from hotswap.train.trainer import micro_batch, total_micro_batches, total_steps

from .conftest import FRUITS


def _train(folder, registry, run_dir, **kwargs):
    return run(prepare(load_recipe(folder, kwargs.pop("overrides", ())), registry), run_dir,
               show_progress=False, **kwargs)


def _mean_loss(history, steps):
    return sum(h["loss"] for h in steps(history)) / len(steps(history))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_loss_falls(write_recipe, registry, tmp_path, method):
    folder = write_recipe(method=method, steps=30, eval_every=10, lr=3e-2, targets='"all-linear"')
    result = _train(folder, registry, tmp_path / "run")
    first, last = _mean_loss(result.loop.history, lambda h: h[:3]), _mean_loss(result.loop.history, lambda h: h[-3:])
    assert last < first - 0.3, (first, last)
    assert result.loop.evals[-1]["eval_loss"] < result.loop.evals[0]["eval_loss"]
    trainable, total = result.trainable_params, result.total_params
    assert (trainable == total) if method == "full" else (0 < trainable < total / 2)


def test_same_seed_same_weights_other_seed_other_weights(write_recipe, registry, tmp_path):
    folder = write_recipe(steps=6, dropout=0.1)
    a = _train(folder, registry, tmp_path / "a")
    b = _train(folder, registry, tmp_path / "b")
    c = _train(folder, registry, tmp_path / "c", overrides=["train.seed=1"])
    assert [h["loss"] for h in a.loop.history] == [h["loss"] for h in b.loop.history]
    assert [h["loss"] for h in a.loop.history] != [h["loss"] for h in c.loop.history]


class _Interrupt(Exception):
    pass


def test_resume_continues_from_checkpoint(write_recipe, registry, tmp_path):
    # dropout > 0 so the RNG state matters; evaluation and checkpoints every 4 steps
    folder = write_recipe(steps=12, dropout=0.1, checkpoint_every=4, eval_every=4)
    whole = prepare(load_recipe(folder), registry)
    straight = run(whole, tmp_path / "straight", show_progress=False)
    expected = trainable_state(whole.model)  # run() trained whole.model in place (PEFT wraps it)

    def stop_at_8(loop):
        if loop.step == 8:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run(prepare(load_recipe(folder), registry), tmp_path / "resumed", on_step=stop_at_8, show_progress=False)
    again = prepare(load_recipe(folder), registry)
    resumed = run(again, tmp_path / "resumed", resume=True, show_progress=False)
    assert resumed.loop.step == 12
    assert [h["step"] for h in resumed.loop.history] == list(range(1, 13))
    assert [h["loss"] for h in resumed.loop.history] == [h["loss"] for h in straight.loop.history]
    got = trainable_state(again.model)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_resume_refuses_missing_or_foreign_checkpoint(write_recipe, registry, tmp_path):
    folder = write_recipe(steps=2)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        _train(folder, registry, tmp_path / "empty", resume=True)
    _train(folder, registry, tmp_path / "run")
    with pytest.raises(CheckpointError, match="different recipe or data"):
        _train(folder, registry, tmp_path / "run", resume=True, overrides=["train.lr=1e-4"])
    with open(folder / "train.jsonl", "a") as handle:  # the same recipe over other data
        handle.write('{"prompt": "colour of lemon?", "completion": "yellow"}\n')
    with pytest.raises(CheckpointError, match="different recipe or data"):
        _train(folder, registry, tmp_path / "run", resume=True)


def test_resume_after_a_save_stopped_between_its_renames(write_recipe, registry, tmp_path):
    """Saving moves the current checkpoint aside before the new one takes its place: a run stopped in
    between resumes from the one moved aside."""
    folder = write_recipe(steps=2)
    _train(folder, registry, tmp_path / "run")
    (tmp_path / "run" / "checkpoint").rename(tmp_path / "run" / "checkpoint.old")
    resumed = _train(folder, registry, tmp_path / "run", resume=True)
    assert resumed.loop.step == 2


def test_early_stopping_keeps_best_weights(write_recipe, registry, tmp_path):
    # A learning rate this high makes the held-out loss rise after the first evaluation.
    folder = write_recipe(method="full", steps=40, full_lr=0.5, eval_every=2, patience=2)
    result = _train(folder, registry, tmp_path / "run")
    assert result.loop.stopped_early and result.loop.step < 40
    assert result.loop.best_step < result.loop.step
    assert result.metrics["eval_loss"] == min(e["eval_loss"] for e in result.loop.evals)
    assert result.loop.evals[-1]["eval_loss"] > result.metrics["eval_loss"]


@pytest.mark.parametrize("examples, batch, accum, epochs, micro, steps", [
    (9, 8, 4, 1.0, 2, 1),  # one step of 2 micro-batches: one pass, not two
    (10, 4, 2, 1.0, 3, 2),  # the second step takes the epoch's last micro-batch alone
    (100, 8, 4, 0.5, 7, 2),
    (100, 8, 1, 2.0, 26, 26),
])
def test_epochs_count_micro_batches(write_recipe, examples, batch, accum, epochs, micro, steps):
    settings = load_recipe(write_recipe()).recipe.train.model_copy(update={
        "max_steps": None, "batch_size": batch, "grad_accum": accum, "epochs": epochs})
    assert (total_micro_batches(settings, examples), total_steps(settings, examples)) == (micro, steps)


def test_the_logged_rate_is_the_one_each_step_used(write_recipe, registry, tmp_path):
    result = _train(write_recipe(steps=4), registry, tmp_path / "run")  # no warm-up: 1e-2 decaying linearly
    assert [round(h["lr"], 6) for h in result.loop.history] == [0.01, 0.0075, 0.005, 0.0025]


def test_a_bad_last_evaluation_is_no_early_stop(write_recipe, registry, tmp_path):
    """Patience running out at the run's last evaluation stops nothing: every step ran."""
    # with min_delta this large no evaluation after the first counts as an improvement
    folder = write_recipe(steps=4, eval_every=2, patience=1, extra="min_delta = 100.0")
    result = _train(folder, registry, tmp_path / "run")
    assert result.loop.step == 4 and [e["step"] for e in result.loop.evals] == [2, 4]
    assert result.loop.bad_evals == 1 and result.loop.stopped_early is False


def test_epochs_cover_every_example_once_per_epoch(write_recipe):
    settings = load_recipe(write_recipe()).recipe.train  # batch 4
    data = list(range(10))
    first_epoch = [x for i in range(3) for x in micro_batch(data, settings, i)]
    assert sorted(first_epoch) == data
    second_epoch = [x for i in range(3, 6) for x in micro_batch(data, settings, i)]
    assert sorted(second_epoch) == data and second_epoch != first_epoch


def test_gradient_accumulation_equals_one_larger_batch(write_recipe, registry, tmp_path):
    """Two micro-batches of 4 step exactly as one batch of 8: every answer token weighs the same, however
    many answer tokens its micro-batch holds (a mean per micro-batch would weight them unequally)."""
    records = [{"prompt": f"colour of {fruit}?", "completion": colour * (i + 1)}  # answers of unequal length
               for i, (fruit, colour) in enumerate(FRUITS.items())]
    folder = write_recipe(method="full", steps=2, train=records)
    weights = []
    for name, batch, accum in (("one", 8, 1), ("two", 4, 2)):
        prep = prepare(load_recipe(folder, [f"train.batch_size={batch}", f"train.grad_accum={accum}"]), registry)
        result = run(prep, tmp_path / name, show_progress=False)
        weights.append((trainable_state(prep.model), [h["loss"] for h in result.loop.history]))
    (one, one_losses), (two, two_losses) = weights
    assert two_losses == pytest.approx(one_losses, rel=1e-6)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)
