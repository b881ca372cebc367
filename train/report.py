"""The comparison report: a Markdown table of what each method cost and scored, a PNG of the
loss curves side by side, and the raw numbers as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .compare import MethodRun
from .metrics import CLASSIFICATION_METRIC

REPORT_FILE = "report.md"
PLOT_FILE = "loss_curves.png"
DATA_FILE = "compare.json"


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _params(n: int, total: int) -> str:
    return f"{n:,} ({100 * n / total:.2f}%)"


def plot_losses(runs: list[MethodRun], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], runs):
        ax.plot([h["step"] for h in run.history], [h["loss"] for h in run.history], label="train loss", lw=1.2)
        if run.evals:
            ax.plot([e["step"] for e in run.evals], [e["eval_loss"] for e in run.evals], "o-", label="held-out loss")
        ax.set_title(f"{run.method}: {run.metric} {run.score:.3f}")
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    per = "example" if runs[0].metric == CLASSIFICATION_METRIC else "answer token"  # a classifier: one class each
    axes[0][0].set_ylabel(f"loss per {per} (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(runs: list[MethodRun], base_score: float, recipe_name: str, out_dir: Path, command: str,
                 machine: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_losses(runs, out_dir / PLOT_FILE)
    (out_dir / DATA_FILE).write_text(json.dumps({"base_score": base_score, "runs": [asdict(r) for r in runs]},
                                                indent=1) + "\n")
    header = "| | " + " | ".join(r.method for r in runs) + " |"
    rows = [
        ("trainable parameters", [_params(r.trainable_params, r.total_params) for r in runs]),
        ("optimizer steps", [str(r.steps) for r in runs]),
        ("wall time (training)", [f"{r.wall_s:,.0f} s ({r.wall_s / max(1, r.steps):.1f} s/step)" for r in runs]),
        ("peak memory", [_size(r.peak_memory_bytes) + (" (CUDA)" if r.device == "cuda" else " (RSS)") for r in runs]),
        ("size on disk", [_size(r.size_bytes) for r in runs]),
        (f"held-out {runs[0].metric}", [f"{r.score:.3f}" for r in runs]),
        ("held-out loss (weights kept)", [f"{r.eval_loss:.4f}" for r in runs]),
    ]
    lines = [
        f"# LoRA vs full fine-tuning: `{recipe_name}`", "",
        f"Measured with `{command}` on {machine}.", "",
        header, "|---" * (len(runs) + 1) + "|",
        *(f"| {label} | " + " | ".join(values) + " |" for label, values in rows), "",
    ]
    lines += [f"The base model without training scores {base_score:.3f} on the same held-out set.", ""]
    lines += [f"![loss curves]({PLOT_FILE})", ""]
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(lines))
    return path
