"""The typer apps (``medvit``, ``medvit lidar``, ``medvit bench``) and the console entry point.

Errors the user caused (a bad file, folder, config or checkpoint) print one line on
stderr and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated

import typer

from medvit.core.errors import MedvitError

app = typer.Typer(
    name="medvit",
    help="Segment CT/MRI volumes with local/global-attention transformers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        import medvit

        typer.echo(f"medvit {medvit.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print medvit's version and exit.")] = False,
) -> None:
    """Segment CT/MRI volumes with local/global-attention transformers."""



lidar_app = typer.Typer(help="LiDAR scans and scenes: sparse-voxel point-cloud transformers.", no_args_is_help=True)
app.add_typer(lidar_app, name="lidar")
bench_app = typer.Typer(help="Benchmarks that measure us against the peer in the same run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors → one line on stderr and exit status 2."""
    import signal

    # SIGTERM (kill, a batch scheduler's time limit) unwinds like Ctrl-C, so temporary files are removed
    with contextlib.suppress(ValueError):  # (only the main thread may set it)
        signal.signal(signal.SIGTERM, _terminated)
    # click's exceptions, from whichever click typer runs on (newer typer vendors its own copy)
    click = sys.modules[typer.BadParameter.__module__]
    no_args_help = getattr(click, "NoArgsIsHelpError", ())
    try:
        rv = app(args=argv, prog_name="medvit", standalone_mode=False)
    except MedvitError as e:
        typer.echo(f"medvit: error: {e}", err=True)
        sys.exit(e.exit_code)
    except no_args_help as e:  # a bare command group: its help (already printed by typer), as click exits
        if e.format_message().strip():
            typer.echo(e.format_message(), err=True)
        sys.exit(e.exit_code)
    except click.UsageError as e:  # a bad or missing option: one line too, not click's boxed panel
        where = e.ctx.command_path if e.ctx is not None else "medvit"
        typer.echo(f"medvit: error: {' '.join(e.format_message().split())} (see '{where} --help')", err=True)
        sys.exit(2)
    except click.ClickException as e:
        typer.echo(f"medvit: error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(e.exit_code)
    except (typer.Abort, getattr(click, "Abort", typer.Abort)):
        typer.echo("medvit: aborted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)

