"""`hotswap train compare`: one recipe trained as a LoRA adapter and as a full fine-tune, each in
a fresh process so wall time and peak memory (RSS on CPU, allocated memory on CUDA) belong to
that run alone; the untrained base is scored in a third. The report (report.py) puts the
numbers side by side."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(slots=True)
class MethodRun:
    """What one side of the comparison measured."""

    method: str
    metric: str
    score: float
    eval_loss: float
    steps: int
    trainable_params: int
    total_params: int
    wall_s: float
    peak_memory_bytes: int
    size_bytes: int
    device: str
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


def _train_one(recipe_spec: str, overrides: tuple[str, ...], method: str, home: str | None, run_dir: str,
               show_progress: bool) -> dict:
    """Runs in a child process: import, train, score, and hand back plain data."""
    from hotswap.hub import Registry

    from .recipe import load_recipe
    from .run import prepare, run

    loaded = load_recipe(recipe_spec, overrides, method=method)
    registry = Registry(home)
    result = run(prepare(loaded, registry), Path(run_dir), show_progress=show_progress)
    return asdict(MethodRun(
        method, result.report.metric, result.report.score, result.metrics["eval_loss"], result.loop.step,
        result.trainable_params, result.total_params, result.wall_s, result.peak_memory_bytes, result.size_bytes,
        result.lineage["device"], result.loop.history, result.loop.evals,
    ))


def _score_base(recipe_spec: str, overrides: tuple[str, ...], home: str | None) -> float:
    from hotswap.hub import Registry

    from .recipe import load_recipe
    from .scoring import score_target

    _label, report, _examples = score_target(load_recipe(recipe_spec, overrides), Registry(home))
    return report.score


def _in_fresh_process(function, *args):
    context = multiprocessing.get_context("spawn")  # a new interpreter: no memory carried over
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def compare(recipe_spec: str, overrides: tuple[str, ...], home: str | None, work_dir: Path,
            methods: tuple[str, ...] = ("lora", "full"), show_progress: bool = True
            ) -> tuple[list[MethodRun], float]:
    """(one run per method, the untrained base's held-out score), each in its own process."""
    spec, overrides = str(recipe_spec), tuple(overrides)
    runs = [MethodRun(**_in_fresh_process(_train_one, spec, overrides, method, home, str(work_dir / method),
                                          show_progress)) for method in methods]
    return runs, _in_fresh_process(_score_base, spec, overrides, home)
