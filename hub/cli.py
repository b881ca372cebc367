"""The `hotswap` console command: the hub's commands plus the sub-commands other packages
register under the entry-point group `hotswap.commands` (loaded only when invoked, so
`hotswap hub ...` never imports torch or the server, and the hub never imports them)."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import click
import typer

from .errors import HubError

ENTRY_POINT_GROUP = "hotswap.commands"
# What the registered sub-commands do, for `hotswap --help`, which must not import them to ask;
# one not named here is listed with a pointer to its own help.
PLUGIN_SUMMARIES = {
    "train": "Train adapters and full fine-tunes from recipes; score, publish, compare, merge.",
    "serve": "Serve a base and its adapters over HTTP (OpenAI-compatible), with API keys and metrics.",
    "bench": "Benchmark the serving engine against HF transformers and PEFT.",
}


def _as_click(obj: object, name: str) -> click.Command:
    if isinstance(obj, typer.Typer):
        obj = typer.main.get_command(obj)
    # typer ships its own copy of click, so its commands are not `click.Command` instances:
    # accept anything with a command's interface.
    if not (hasattr(obj, "main") and hasattr(obj, "make_context")):
        raise click.ClickException(f"plugin command {name!r} is not a click command or typer app")
    return obj  # type: ignore[return-value]


class RootGroup(click.Group):
    """`hotswap`: `hub` is built in; `train`, `serve`, `bench` come from entry points."""

    def _plugins(self) -> dict:
        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._plugins()))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing must not import the plugins (torch, the server): name them without loading.
        rows = [("hub", "The adapter registry: bases, adapters and full models, versioned.")]
        rows += [(name, PLUGIN_SUMMARIES.get(name, f"See `hotswap {name} --help`."))
                 for name in sorted(self._plugins())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        plugin = self._plugins().get(name)
        if plugin is None:
            return None
        command = _as_click(plugin.load(), name)
        command.name = name
        return command


def build_cli() -> click.Group:
    from .commands import app as hub_app

    root = RootGroup(
        name="hotswap",
        help="hotswap: an adapter registry and a multi-adapter inference server on one frozen base.",
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    hub = typer.main.get_command(hub_app)
    hub.name = "hub"
    root.add_command(hub)
    return root


def main(argv: list[str] | None = None) -> None:
    """Run the command; every refusal exits non-zero with its reason on stderr."""
    cli = build_cli()
    try:
        cli.main(args=argv, prog_name="hotswap", standalone_mode=False)
    except (click.exceptions.Exit, typer.Exit) as exc:
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, typer.Abort) as exc:
        if isinstance(exc.__cause__, EOFError):  # click wraps any EOFError a command raises, not only Ctrl-D
            click.echo(f"error: unexpected end of data{f': {exc.__cause__}' if str(exc.__cause__) else ''}", err=True)
            sys.exit(1)
        click.echo("aborted", err=True)
        sys.exit(130)
    except HubError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:
        # Usage errors of click or of typer's own copy of it: both carry `show()` and `exit_code`.
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
