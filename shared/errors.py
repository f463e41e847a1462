"""The project's error type for the user's mistakes.

A `UserError` is something the user can act on (a missing file, a wrong flag, a folder that is not
ours); the CLI shows its message in one line. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os


class UserError(ValueError):
    """Bad input or a refused action; the message names the file or option and what to do.

    A ValueError, so code that validates values can catch it like any other bad value."""


def describe_os_error(error: OSError) -> str:
    """One line for an OS error: what failed and on which path (no traceback)."""
    path = error.filename if error.filename is not None else ""
    reason = error.strerror or str(error)
    if error.filename2 is not None:
        path = f"{path} → {error.filename2}"
    return f"{path}: {reason}" if path else reason


# Clip ids become file names with up to 32 bytes added (`.<id>_frames.png.<random>.tmp`), and a
# name may have 255 bytes on common file systems.
MAX_ID_BYTES = 200


def id_length_problem(clip_id: str) -> str | None:
    """Why an id is too long to become a file name, or None."""
    size = len(clip_id.encode("utf-8"))
    if size <= MAX_ID_BYTES:
        return None
    return (f"id {clip_id[:40]!r}... is {size} bytes; ids become file names (with up to 32 bytes added, and 255 "
            f"allowed), so at most {MAX_ID_BYTES}")


def is_plain_file_name(name: str) -> bool:
    """A name that stays inside the folder it is joined to: no separator, not `.`/`..`, not hidden."""
    return (bool(name) and name not in (".", "..") and not name.startswith(".") and "\x00" not in name
            and os.sep not in name and "/" not in name and "\\" not in name)
