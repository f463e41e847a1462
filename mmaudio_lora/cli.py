"""The `mmaudio-lora` command: a thin shell over the stages' library functions.

Heavy imports (torch, models) happen inside the commands so that `--help` stays instant.
"""
from __future__ import annotations

import logging

import typer

from mmaudio_lora import __version__

app = typer.Typer(
    help="Fine-tune MMAudio with LoRA on your own videos: precompute features, train, generate.",
    no_args_is_help=True,
    add_completion=False,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"mmaudio-lora {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
