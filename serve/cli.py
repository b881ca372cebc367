"""Command-line entry points of the serving side, found by the root ``hotswap`` command.

``serve_app`` is filled by the HTTP server; ``bench_app`` runs the engine benchmark (serve/bench.py).
"""

from __future__ import annotations

import typer

from .api.command import serve as _serve_command

serve_app = typer.Typer(help="Run the multi-adapter inference server.", no_args_is_help=True)
serve_app.command(name="serve")(_serve_command)
bench_app = typer.Typer(help="Benchmark the serving engine against HF transformers and PEFT.")
