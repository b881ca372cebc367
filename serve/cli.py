"""Command-line entry points of the serving side, found by the root ``hotswap`` command.

``serve_app`` is filled by the HTTP server; ``bench_app`` runs the engine benchmark (serve/bench.py).
"""

from __future__ import annotations

from typing import Optional

import typer

from .api.command import device_problem
from .api.command import serve as _serve_command

serve_app = typer.Typer(help="Run the multi-adapter inference server.", no_args_is_help=True, add_completion=False)
serve_app.command(name="serve")(_serve_command)
bench_app = typer.Typer(help="Benchmark the serving engine against HF transformers and PEFT.", add_completion=False)


@bench_app.command()
def bench(
    base: str = typer.Option("smollm2", help="registry reference of the base to benchmark"),
    home: Optional[str] = typer.Option(None, help="registry folder (default: $HOTSWAP_HOME or the per-user one)"),
    shape: Optional[str] = typer.Option(None, help="use a random-init Llama shape instead: tiny, smol, 1b, 8b"),
    batch: int = typer.Option(8, help="requests in the batch"),
    prompt: int = typer.Option(64, help="prompt tokens per request"),
    new_tokens: int = typer.Option(32, help="generated tokens per request"),
    adapters: int = typer.Option(8, help="distinct adapters in the mixed batch"),
    rank: int = typer.Option(16, help="LoRA rank of the benchmark adapters"),
    repeat: int = typer.Option(5, help="timed rounds, each running every configuration once (medians reported)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)"),
    lora_dtype: Optional[str] = typer.Option(None, help="the engine's adapter rows: float32, bfloat16 or float16 "
                                                        "(default: the base's dtype); the adapters are saved in it"),
    skip_hf: bool = typer.Option(False, "--skip-hf", help="engine only (no HF / PEFT baselines)"),
    dora: bool = typer.Option(False, "--dora", help="DoRA adapters instead of LoRA (with --skip-hf)"),
    edges: bool = typer.Option(False, "--edges", help="the adapters also target embed_tokens and lm_head"),
    shared_prefix: int = typer.Option(0, help="also time the mixed batch after a prefix of this many tokens "
                                              "common to its requests: computed, and reused from the prefix cache"),
    traffic: int = typer.Option(0, help="instead: this many requests arriving as a Poisson process, each for "
                                        "an adapter drawn by popularity, run on the bare base and on their "
                                        "adapters (engine only; --prompt and --new-tokens are mean lengths)"),
    rate: float = typer.Option(4.0, help="with --traffic: mean arrivals per second"),
    zipf: float = typer.Option(1.0, help="with --traffic: adapter k is drawn with weight 1/(k+1)^zipf"),
    slots: int = typer.Option(0, help="with --traffic: adapters the device pool holds (0: half of --adapters)"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Tokens/s of the engine (base only, N adapters mixed) beside HF generate and PEFT's mixed batch;
    with --traffic, an open-loop workload over more adapters than device slots."""
    from .bench import SHAPES, BenchSettings, run
    from .bench_report import format_table, to_json
    from .engine.config import DTYPES, EngineConfig

    if shape is not None and shape not in SHAPES:
        raise typer.BadParameter(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}", param_hint="--shape")
    for flag, value in (("--dtype", dtype), ("--lora-dtype", lora_dtype)):
        if value not in (None, *DTYPES):
            raise typer.BadParameter(f"unknown dtype {value!r}; one of {', '.join(DTYPES)}", param_hint=flag)
    problem = device_problem(device)  # else a traceback from torch once the first model is built
    if problem:
        raise typer.BadParameter(problem.split(": ", 1)[1], param_hint="--device")
    try:
        EngineConfig(device=device, dtype=dtype, lora_dtype=lora_dtype)
    except AssertionError as exc:
        raise typer.BadParameter(str(exc), param_hint="--lora-dtype") from None
    if min(batch, prompt, new_tokens, adapters, rank, repeat) < 1:
        raise typer.BadParameter("batch, prompt, new-tokens, adapters, rank and repeat must be >= 1")
    if shared_prefix < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--shared-prefix")
    if traffic:  # lengths vary to 1.5x the means (bench_traffic._lengths)
        _check_context(base, home, shape, prompt + prompt // 2, new_tokens + new_tokens // 2, 0, traffic=True)
        _traffic(traffic, rate, zipf, slots, shared_prefix, json_out, base=base, home=home, shape=shape, prompt=prompt,
                 new_tokens=new_tokens, adapters=adapters, rank=rank, repeat=repeat, device=device, dtype=dtype,
                 lora_dtype=lora_dtype, dora=dora, edges=edges)
        return
    if dora and not skip_hf:
        raise typer.BadParameter("PEFT's mixed batch does not take DoRA adapters: add --skip-hf", param_hint="--dora")
    if adapters > batch:  # request i goes to adapter i % adapters: the rest would never be mixed in
        raise typer.BadParameter(f"{adapters} adapters cannot all be mixed in a batch of {batch} requests; "
                                 "give --batch at least --adapters (or use --traffic for more adapters than "
                                 "a batch)", param_hint="--adapters")
    _check_context(base, home, shape, prompt, new_tokens, shared_prefix)
    settings = BenchSettings(base=base, home=home, shape=shape, batch=batch, prompt=prompt, new_tokens=new_tokens,
                             adapters=adapters, rank=rank, repeat=repeat, device=device,
                             dtype=dtype, lora_dtype=lora_dtype, skip_hf=skip_hf, shared_prefix=shared_prefix,
                             dora=dora, edges=edges)
    result = run(settings)
    typer.echo(to_json(result) if json_out else format_table(result))


def _check_context(base: str, home: str | None, shape: str | None, prompt: int, new_tokens: int,
                   shared_prefix: int, traffic: bool = False) -> None:
    """Refuse a request longer than the base's context now: the engine would refuse it only after
    every model and adapter had been built."""
    import json

    from hotswap.hub import HubError, Registry

    from .bench import SHAPE_POSITIONS
    from .engine.resolve import not_a_base
    from .engine.worker import MAX_CONTEXT

    if shape is not None:
        positions = SHAPE_POSITIONS
    else:
        try:
            registry = Registry(home)
            try:
                snapshot = registry.open(base, verify=False)  # the set-up verifies it
                if problem := not_a_base(snapshot.version):
                    raise typer.BadParameter(problem, param_hint="--base")
                config = snapshot.path / "config.json"
                positions = json.loads(config.read_text()).get("max_position_embeddings", MAX_CONTEXT)
            finally:
                registry.close()
        except HubError as exc:
            raise typer.BadParameter(str(exc), param_hint="--base") from None
        except (OSError, ValueError):  # not a readable base: the set-up says what is wrong with it
            return
    limit = min(positions, MAX_CONTEXT)  # the engine's context, as it would take it (max_model_len unset)
    total = shared_prefix + prompt + new_tokens
    if total > limit:
        parts = (f"the longest request, {prompt} + {new_tokens} tokens (--prompt and --new-tokens are means, "
                 "lengths go to 1.5x)" if traffic else
                 f"{'--shared-prefix + ' if shared_prefix else ''}--prompt + --new-tokens = "
                 f"{' + '.join(str(n) for n in (shared_prefix, prompt, new_tokens) if n)}")
        raise typer.BadParameter(f"{parts} = {total} tokens exceeds the base's context of {limit} tokens",
                                 param_hint="--prompt")


def _traffic(requests: int, rate: float, zipf: float, slots: int, shared_prefix: int, json_out: bool, **common) -> None:
    from .bench_report import to_json
    from .bench_traffic import TrafficSettings, format_traffic, run_traffic

    if requests < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--traffic")
    if rate <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--rate")
    if zipf < 0 or slots < 0:
        raise typer.BadParameter("--zipf and --slots must be >= 0")
    if shared_prefix:
        raise typer.BadParameter("the traffic workload has no shared prefix", param_hint="--shared-prefix")
    result = run_traffic(TrafficSettings(requests=requests, rate=rate, zipf=zipf, slots=slots, skip_hf=True, **common))
    typer.echo(to_json(result) if json_out else format_traffic(result))
