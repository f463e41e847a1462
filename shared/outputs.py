"""Where we may write: a command replaces only what mmaudio-lora wrote.

Every output folder carries a marker (the feature folder's manifest, the run's config, a
generation folder's `.mmaudio-lora`), and a folder is used only when it is new, empty, or carries
that marker. Anything else is refused in one line, before any work starts, and nothing of the
user's is moved or deleted.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from shared.errors import UserError


GENERATED_MARKER = ".mmaudio-lora"


class OutputError(UserError):
    """An output path we must not write to."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_folder(folder: str | os.PathLike, marker: str, what: str,
                        protected: tuple[Path, ...] = ()) -> Path:
    """`folder` resolved, if it may receive our output: absent, empty, or carrying `marker`.

    `protected` are the user's inputs (videos, lists): the folder may not hold any of them.
    """
    folder = Path(folder).resolve()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder; give a folder for the {what}")
    if _inside(Path.cwd().resolve(), folder):
        raise OutputError(f"{folder}: is the current folder or holds it; give the {what} a folder of its own")
    for path in protected:
        if _inside(Path(path).resolve(), folder):
            raise OutputError(f"{folder}: holds your input {path}; give the {what} a folder of its own")
    if folder.is_dir() and not (folder / marker).exists() and any(folder.iterdir()):
        raise OutputError(f"{folder}: holds files mmaudio-lora did not write (no {marker}); "
                          f"choose a new or empty folder for the {what}")
    return folder


def claim_generated_folder(folder: str | os.PathLike, protected: tuple[Path, ...] = ()) -> Path:
    """Check a generation output folder and mark it as ours."""
    folder = check_output_folder(folder, GENERATED_MARKER, "generated audio", protected)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / GENERATED_MARKER
        if not marker.exists():
            atomic_write_text(marker, json.dumps({"tool": "mmaudio-lora", "kind": "generated"}) + "\n")
    except OSError as error:
        raise OutputError(f"cannot write to {folder}: {error.strerror or error}") from None
    return folder


def replace_folder(staging: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Put the finished `staging` folder in place of `folder` (ours), never leaving neither:
    the old one is renamed aside, the new one renamed in, then the old one deleted."""
    staging, folder = Path(staging), Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """The one way we write a file: into a temporary file beside `path` (yielded), renamed onto
    `path` when the block succeeds and removed when it fails, so `path` is never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o644)  # mkstemp makes it private; ours are ordinary files
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)
