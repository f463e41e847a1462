"""Where we may write: a command replaces only what mmaudio-lora wrote.

Every folder we write carries a marker only we write, `.mmaudio-lora`, holding the kind of folder
(features, run, generated, demo) and our version; a folder is used only when it is new, empty, or
carries the marker of its kind. A common file name (`config.json`, `manifest.json`) never makes a
folder ours. Anything else is refused in one line, before any work starts, and nothing of the
user's is moved or deleted. One lock per folder keeps two commands from writing it at once.
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

MARKER = ".mmaudio-lora"
KINDS = {"features": "feature folder", "run": "training run", "generated": "generated-audio folder",
         "demo": "demo folder", "crossval": "cross-validation", "report": "evaluation report",
         "scratch": "working folder"}


# The kinds of our folders that another folder of ours may hold: a demo holds a whole project, a
# cross-validation its fold runs and its report, a run its evaluation's report. Nothing else nests,
# so deleting or replacing one folder of ours never takes another with it.
HOLDS = {"demo": frozenset(KINDS), "crossval": frozenset({"run", "report"}), "run": frozenset({"report"})}


class OutputError(UserError):
    """An output path we must not write to."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def folder_kind(folder: str | os.PathLike) -> str | None:
    """The kind of mmaudio-lora folder this is (a key of KINDS), from its marker; None otherwise."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _kind_before_markers(folder)
    if isinstance(marker, dict) and marker.get("tool") == "mmaudio-lora" and marker.get("kind") in KINDS:
        return marker["kind"]
    return None


def _kind_before_markers(folder: Path) -> str | None:
    """Feature folders and runs written before the marker existed, by our own keys inside their
    JSON (never by the file's name alone)."""
    def read(name: str):
        try:
            return json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    manifest = read("manifest.json")
    if isinstance(manifest, dict) and manifest.get("tool") == "mmaudio-lora" and "format_version" in manifest:
        return "features"
    config = read("config.json")
    if isinstance(config, dict) and {"features", "target_modules", "null_condition_probability"} <= config.keys():
        return "run"
    return None


def mark_folder(folder: str | os.PathLike, kind: str) -> Path:
    """Write the marker that makes `folder` a `kind` folder of ours."""
    from shared import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MARKER, json.dumps({"tool": "mmaudio-lora", "kind": kind, "version": __version__}) + "\n")
    return folder


def check_output_folder(folder: str | os.PathLike, kind: str, protected: tuple[Path, ...] = ()) -> Path:
    """`folder` resolved, if it may receive our output of `kind`: absent, empty, or carrying that
    kind's marker, and not nested in another folder of ours (see `check_not_nested`). `protected`
    are the user's inputs (videos, lists): the folder may not hold any."""
    what = KINDS[kind]
    folder = Path(folder).resolve()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder; give a folder for the {what}")
    if _inside(Path.cwd().resolve(), folder):
        raise OutputError(f"{folder}: is the current folder or holds it; give the {what} a folder of its own")
    for path in protected:
        if _inside(Path(path).resolve(), folder):
            raise OutputError(f"{folder}: holds your input {path}; give the {what} a folder of its own")
    if folder.is_dir() and any(folder.iterdir()):
        found = folder_kind(folder)
        if found is None:
            raise OutputError(f"{folder}: holds files mmaudio-lora did not write (no {MARKER} marker); "
                              f"choose a new or empty folder for the {what}")
        if found != kind:
            raise OutputError(f"{folder}: is a {KINDS[found]} of mmaudio-lora, not a {what}; choose another folder")
    check_not_nested(folder, kind)
    return folder


def check_not_nested(folder: str | os.PathLike, kind: str) -> None:
    """Refuse a `kind` folder inside another folder of ours that does not hold that kind (a run in a
    feature folder, a cross-validation in a run: deleting the outer one would delete it), and a
    folder of ours that holds another of a kind it may not hold (made before this rule)."""
    folder = Path(folder).resolve()
    what = KINDS[kind]
    outer = next((parent for parent in folder.parents if folder_kind(parent) is not None), None)
    if outer is not None and kind not in HOLDS.get(folder_kind(outer), ()):
        raise OutputError(f"{folder}: is inside the {KINDS[folder_kind(outer)]} {outer}, which mmaudio-lora may "
                          f"replace or delete whole; give the {what} a folder outside it")
    for inner in _inner_folders(folder):
        inner_kind = folder_kind(inner)
        if inner_kind not in HOLDS.get(kind, ()):
            raise OutputError(f"{folder}: holds a {KINDS[inner_kind]} of mmaudio-lora ({inner}) that replacing the "
                              f"{what} would delete; move it out first")


def _inner_folders(folder: Path) -> list[Path]:
    """The outermost folders of ours inside `folder` (not descending into them)."""
    found = []
    if not folder.is_dir():
        return found
    for root, folders, _ in os.walk(folder):
        for name in list(folders):
            path = Path(root) / name
            if (path / MARKER).is_file() and folder_kind(path) is not None:
                found.append(path)
                folders.remove(name)
    return found


def claim_output_folder(folder: str | os.PathLike, kind: str, protected: tuple[Path, ...] = ()) -> Path:
    """Check an output folder (as `check_output_folder`), create it and mark it as ours."""
    folder = check_output_folder(folder, kind, protected)
    return mark_output_folder(folder, kind)


def mark_output_folder(folder: Path, kind: str) -> Path:
    """Create a checked output folder and mark it as ours (when it is not yet)."""
    try:
        if folder_kind(folder) != kind or not (folder / MARKER).is_file():
            mark_folder(folder, kind)
    except OSError as error:
        raise OutputError(f"cannot write to {folder}: {error.strerror or error}") from None
    return folder


@contextmanager
def folder_lock(folder: Path, command: str, shared: bool = False) -> Iterator[None]:
    """Hold `.<name>.lock` beside `folder` while `command` uses it: a writer (train, features)
    holds it alone, readers (`shared`: evaluate, generate, export of a run) together, and a
    command that cannot have it stops at once, naming who holds it (the OS releases the lock even
    if the holder is killed). In a torchrun job rank 0 holds it for every rank."""
    import fcntl

    if os.environ.get("RANK", "0") != "0":
        yield
        return
    folder = Path(folder)
    path = folder.parent / f".{folder.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            doing = f"another command ({holder}) is writing" if holder else "another command is reading"
            raise UserError(f"{folder}: {doing} this folder; wait for it to finish (or stop it), then run "
                            f"`{command}` again") from None
        try:  # the holder before us may have removed the file after we opened it: lock the file that is there
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    with handle:
        if not shared:
            handle.seek(0)
            handle.truncate()
            handle.write(f"`{command}`, pid {os.getpid()}")
            handle.flush()
        try:
            yield
        finally:
            try:  # the last one out removes the file (a reader only when no other holds it)
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink(missing_ok=True)
            except BlockingIOError:
                pass


def replace_folder(staging: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Put the finished `staging` folder in place of `folder` (ours), never leaving neither:
    the old one is renamed aside, the new one renamed in, then the old one deleted. A folder in
    the aside place that is not ours (no marker, and not inside a folder of ours) is never
    touched: the swap stops, naming it."""
    staging, folder = Path(staging), Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if old.exists():
        if not ours(old):
            raise OutputError(f"{old}: a folder mmaudio-lora did not make is where it keeps the previous {folder.name} "
                              "during a swap; move or rename it, then run again")
        shutil.rmtree(old)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def ours(path: str | os.PathLike) -> bool:
    """Whether a folder is mmaudio-lora's to remove: it carries our marker, or sits inside a folder
    that does (an adapter in a run, a report's staging)."""
    path = Path(path)
    return folder_kind(path) is not None or any(folder_kind(parent) is not None for parent in path.parents)


FULL_BELOW = 16 * 2 ** 20  # free bytes under which a failed write is put down to a full disk


def free_bytes(path: str | os.PathLike) -> int:
    """Free space of the file system that holds `path` (or would: its nearest existing folder)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def require_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """Stop with one line before writing `needed` bytes at `path` when the disk cannot take them
    (a memmap written to a full disk kills the process with SIGBUS, and no message)."""
    free = free_bytes(path)
    if free < needed + FULL_BELOW:
        raise OutputError(f"{path}: not enough disk space for {what}: {_size(needed)} needed and "
                          f"{_size(FULL_BELOW)} kept free as a margin, {_size(free)} free; free some space (or write "
                          "elsewhere) and run again")


def _size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """The one way we write a file: into a temporary file beside `path` (yielded), renamed onto
    `path` when the block succeeds and removed when it fails, so `path` is never half written. A
    write that fails on a full disk (whatever the writer raised: torch, safetensors, the OS) is one
    line naming the path and the space."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o644)  # mkstemp makes it private; ours are ordinary files
        os.replace(temporary, path)
    except Exception:
        temporary.unlink(missing_ok=True)
        if free_bytes(path.parent) < FULL_BELOW:
            raise OutputError(f"{path}: the disk is full ({_size(free_bytes(path.parent))} free); free some space "
                              "and run again (nothing half-written was left)") from None
        raise
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)
