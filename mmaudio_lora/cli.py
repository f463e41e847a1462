"""The `mmaudio-lora` command: a thin shell over the stages' library functions.

Heavy imports (torch, models) happen inside the commands so that `--help` stays instant.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

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


LICENCE_NOTE = ("MMAudio's code is MIT, but its checkpoints are CC-BY-NC 4.0 (non-commercial) and were "
                "trained on datasets with their own licences: check before any commercial use.")

VARIANT_HELP = "Network variant: small_16k, small_44k, medium_44k, large_44k or large_44k_v2."
WEIGHTS_HELP = "Folder holding the official weight files by name [default: data/weights, or $MMAUDIO_LORA_WEIGHTS]."


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e8 else f"{num_bytes / 1e6:.1f} MB"


@app.command()
def doctor(
    variant: str = typer.Option("large_44k_v2", help=VARIANT_HELP),
    weights_dir: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
) -> None:
    """Check that every weight file of a variant is in place, and whether CUDA is usable.

    Exits non-zero when a needed file is missing.
    """
    from shared.device import cuda_status
    from shared.weights import check_files, default_weights_dir, mode_of

    try:
        statuses = check_files(variant, weights_dir)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--variant")
    typer.echo(f"variant {variant} (audio {mode_of(variant)}), weights folder {weights_dir or default_weights_dir()}")
    for status in statuses:
        wf = status.weight_file
        needed_by = ", ".join(status.commands)
        if status.found:
            typer.echo(f"  found    {wf.purpose:<26} {status.path} ({_size(status.path.stat().st_size)})  [{needed_by}]")
        else:
            size = f"about {_size(wf.approx_bytes)}" if wf.approx_bytes else "size not published"
            typer.echo(f"  MISSING  {wf.purpose:<26} {wf.relative_path}  from {wf.url} ({size})  [{needed_by}]")
    typer.echo(f"CUDA: {cuda_status()}")
    typer.echo(f"Licence: {LICENCE_NOTE}")
    missing = [s for s in statuses if not s.found]
    if missing:
        typer.echo(f"{len(missing)} file(s) missing: run `mmaudio-lora download --variant {variant}`.")
        raise typer.Exit(1)
    typer.echo("All files in place.")


@app.command()
def download(
    variant: str = typer.Option("large_44k_v2", help=VARIANT_HELP),
    weights_dir: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    mirror: Optional[str] = typer.Option(None, help="Base URL of a mirror serving the files by their official names."),
) -> None:
    """Download the weight files of a variant that are missing (resumes partial files, verifies md5)."""
    from shared.weights import DownloadError, download_missing

    try:
        fetched = download_missing(variant, weights_dir, mirror)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--variant")
    except DownloadError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1)
    for path in fetched:
        typer.echo(f"downloaded {path} ({_size(path.stat().st_size)})")
    typer.echo("Nothing to download: all files in place." if not fetched else f"{len(fetched)} file(s) downloaded.")
