"""`hotswap train compare`: one recipe trained as a LoRA adapter and as a full fine-tune, each in
a fresh process so wall time and peak memory (RSS on CPU, allocated memory on CUDA) belong to
that run alone. The report (report.py) puts the numbers side by side."""

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
    base_score: float | None
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
               eval_base: bool, show_progress: bool) -> dict:
    """Runs in a child process: import, train, score, and hand back plain data."""
    from hotswap.hub import Registry

    from .recipe import load_recipe
    from .run import prepare, run

    loaded = load_recipe(recipe_spec, overrides, method=method)
    registry = Registry(home)
    result = run(prepare(loaded, registry), Path(run_dir), eval_base=eval_base, show_progress=show_progress)
    return asdict(MethodRun(
        method, result.report.metric, result.report.score,
        result.base_report.score if result.base_report else None, result.metrics["eval_loss"], result.loop.step,
        result.trainable_params, result.total_params, result.wall_s, result.peak_memory_bytes, result.size_bytes,
        result.lineage["device"], result.loop.history, result.loop.evals,
    ))


def compare(recipe_spec: str, overrides: tuple[str, ...], home: str | None, work_dir: Path,
            methods: tuple[str, ...] = ("lora", "full"), show_progress: bool = True) -> list[MethodRun]:
    """Train the recipe once per method, each in its own spawned process; the first also scores the base."""
    runs = []
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no memory carried over
    for i, method in enumerate(methods):
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            job = pool.submit(_train_one, str(recipe_spec), tuple(overrides), method, home,
                              str(work_dir / method), i == 0, show_progress)
            runs.append(MethodRun(**job.result()))
    return runs
