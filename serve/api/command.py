"""`hotswap serve`: build the registry, the engine and the app from flags, then run uvicorn.

Only typer is imported at module level: `hotswap bench` shares the CLI module and should not pay for
importing the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

MiB = 1 << 20
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def serve(
    base: Annotated[str, typer.Option(help="The base to serve: a registry reference (name, name@2, name@prod).")],
    home: Annotated[Optional[Path], typer.Option(help="Registry folder (default: $HOTSWAP_HOME or the per-user one).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on. Beyond loopback, API keys are required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_keys: Annotated[Optional[Path], typer.Option(
        "--api-keys", help="API key file (JSON, or TOML when named *.toml); also read: $HOTSWAP_API_KEYS, "
                           "$HOTSWAP_ADMIN_KEY.")] = None,
    public_metrics: Annotated[bool, typer.Option(help="Serve /metrics without a key.")] = False,
    default_max_tokens: Annotated[int, typer.Option(help="max_tokens of chat requests that give none.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU).")] = None,
    max_running: Annotated[int, typer.Option(help="Sequences decoding at once.")] = 32,
    max_queue: Annotated[int, typer.Option(help="Waiting requests before 429.")] = 1024,
    max_batch_tokens: Annotated[int, typer.Option(help="Tokens in one forward step.")] = 512,
    max_model_len: Annotated[Optional[int], typer.Option(help="Context length (default: the base's, at most 8192).")] = None,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 4096,
    kv_cache_mib: Annotated[int, typer.Option(help="KV cache of the base, MiB.")] = 512,
    prefix_caching: Annotated[bool, typer.Option(
        help="Reuse the KV of prompt prefixes already computed for the same version (and cache_salt).")] = True,
    max_rank: Annotated[int, typer.Option(help="Highest LoRA rank accepted.")] = 64,
    lora_capacity_mib: Annotated[int, typer.Option(help="Device memory for adapter slots, MiB.")] = 256,
    lora_dtype: Annotated[Optional[str], typer.Option(
        help="Adapter rows stored in float32, bfloat16 or float16 (default: the base's dtype, exact). Narrower "
             "rows hold more adapters per MiB and round each value once, at load.")] = None,
    edge_lora_rows: Annotated[int, typer.Option(
        help="Rows (rank x adapters) of the embed_tokens and lm_head LoRA pools; 0 refuses such adapters.")] = 64,
    host_cache_mib: Annotated[int, typer.Option(help="Host (CPU) cache of loaded adapters, MiB.")] = 1024,
    model_memory_mib: Annotated[int, typer.Option(help="Memory for full fine-tuned models beside the base, MiB.")] = 2048,
    lora_batch_cache_mib: Annotated[Optional[int], typer.Option(
        help="Gathered adapter rows kept across decode steps, MiB (default: 256 on CPU, 2048 on GPU).")] = None,
    load_workers: Annotated[int, typer.Option(help="Threads loading cold adapters.")] = 1,
    log_level: Annotated[str, typer.Option(help="Log level of uvicorn and of the server's own lines.")] = "info",
) -> None:
    """Serve BASE and every adapter of it over HTTP (OpenAI-compatible), until interrupted."""
    import logging

    import uvicorn

    from hotswap.hub import HubError, Registry

    from ..engine import Engine, EngineConfig
    from ..engine.resolve import not_a_base
    from .app import create_app
    from .server import DrainingServer
    from .settings import KeySettingsError, ServerSettings, load_keys

    try:
        settings = ServerSettings(host=host, port=port, keys=load_keys(api_keys), public_metrics=public_metrics,
                                  default_max_tokens=default_max_tokens)
        settings.check_binding()
    except (KeySettingsError, ValueError) as exc:
        typer.echo(f"error: {settings_error(exc)}", err=True)
        raise typer.Exit(2) from None
    problem = device_problem(device) or listen_problem(host, port)
    if problem:  # else found only once the base has loaded: the server would start and answer 503, or exit
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)
    try:
        config = EngineConfig(
            device=device, dtype=dtype, max_running=max_running, max_queue=max_queue, max_batch_tokens=max_batch_tokens,
            max_model_len=max_model_len, max_tokens_limit=max_tokens_limit, kv_cache_bytes=kv_cache_mib * MiB,
            max_rank=max_rank, lora_capacity_bytes=lora_capacity_mib * MiB, lora_dtype=lora_dtype,
            edge_lora_rows=edge_lora_rows,
            host_cache_bytes=host_cache_mib * MiB,
            lora_batch_cache_bytes=None if lora_batch_cache_mib is None else lora_batch_cache_mib * MiB,
            model_memory_bytes=model_memory_mib * MiB, load_workers=load_workers, prefix_caching=prefix_caching)
    except (AssertionError, RuntimeError, ValueError) as exc:  # RuntimeError: torch's refusal of --device
        typer.echo(f"error: invalid engine flags: {str(exc) or 'a size or count is not positive'}", err=True)
        raise typer.Exit(2) from None
    if log_level.lower() not in LOG_LEVELS:  # uvicorn would refuse it only after the base loaded
        typer.echo(f"error: --log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}", err=True)
        raise typer.Exit(2)
    # the server's own lines (readiness, shutdown, errors) follow the flag as uvicorn's do
    logging.getLogger("hotswap").setLevel(uvicorn.config.LOG_LEVELS[log_level.lower()])

    registry = Registry(home)
    try:
        version = registry.resolve(base)
    except HubError as exc:
        typer.echo(f"error: --base {base}: {exc}", err=True)
        raise typer.Exit(2) from None
    if problem := not_a_base(version):
        typer.echo(f"error: --base {base}: {problem}", err=True)
        raise typer.Exit(2)

    engine = Engine(registry, base, config)
    app = create_app(engine, registry, settings)
    typer.echo(startup_banner(settings, version.ref, registry.home), err=True)
    DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level), engine).run()


def settings_error(exc: Exception) -> str:
    """A refusal of the server settings on one line, naming the flag (pydantic's own text spans
    several lines and links to its docs)."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    return "; ".join((f"--{str(e['loc'][0]).replace('_', '-')}: " if e["loc"] else "")
                     + e["msg"].removeprefix("Value error, ") for e in exc.errors())


def device_problem(device: str) -> str | None:
    """Why the engine cannot run on `device` (None if it can), before any model is built."""
    import torch

    if device == "auto":
        return None
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return f"--device {device!r}: not a device; give auto, cpu, cuda or cuda:N"
    if parsed.type not in ("cpu", "cuda"):
        return f"--device {device!r}: the engine runs on cpu or cuda"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: this torch ({torch.__version__}) sees no CUDA device"
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        return f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)"
    return None


def listen_problem(host: str, port: int) -> str | None:
    """Why uvicorn could not listen on host:port (None if it can): a port in use, or a host that is
    no address of this machine. Bound and released at once, with uvicorn's SO_REUSEADDR."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def startup_banner(settings, base_ref: str, home: Path) -> str:
    if settings.auth_enabled:
        roles = {r: [k.name for k in settings.keys if k.role == r] for r in ("admin", "user")}
        auth = f"auth: {len(settings.keys)} API keys (admin: {', '.join(roles['admin']) or 'none'}; " \
               f"user: {', '.join(roles['user']) or 'none'})"
    else:
        auth = "auth: OFF (no API keys configured), so listening on loopback only; every caller is admin"
    return (f"hotswap: serving base {base_ref} from the registry at {home}\n"
            f"hotswap: {http_url(settings.host, settings.port)}  (OpenAPI at /schema)  {auth}")


def http_url(host: str, port: int) -> str:
    """The server's address as a URL: an IPv6 host in brackets (``http://[::1]:8000``)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
