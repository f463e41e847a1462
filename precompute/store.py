"""The feature output folder: one ExtractedVGG memmap, its TSV, a manifest and a skip report.

    <out>/memmap/       TensorDict memmap: mean, std, clip_features, sync_features, text_features,
                        duration_sec (an extra key ExtractedVGG ignores)
    <out>/clips.tsv     id, label, group (the source video): one row per memmap row, same order
    <out>/manifest.json tool version, settings, encoder weight identity, per-clip fingerprints
    <out>/skipped.txt   one line per clip left out, and why
    <out>/.mmaudio-lora marks the folder as a feature folder of ours

A run writes into a staging folder beside `<out>` and swaps it in; encoded clips wait in a work
folder beside it (`.<name>.work/`), so a killed run loses nothing and resumes. Each helper folder
carries our marker from the moment it exists; one beside `<out>` that does not is the user's, and
is never deleted, moved or reused (the run stops, naming it).
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

from shared.feature_files import MANIFEST_NAME, MEMMAP_DIR, SKIPPED_NAME, TSV_NAME
from shared.outputs import OutputError, atomic_path, atomic_write_text, mark_folder, ours, replace_folder, require_space

MEDIA_KEYS = ("mean", "std", "clip_features", "sync_features", "duration_sec")
TEXT_KEY = "text_features"
FORMAT_VERSION = 1


def sibling(out: Path, suffix: str) -> Path:
    return out.parent / f".{out.name}.{suffix}"


def check_helpers(out: Path) -> None:
    """Refuse to start while a helper folder's place beside `out` holds something that is not ours."""
    for suffix in ("old", "staging", "work"):
        helper = sibling(out, suffix)
        if helper.exists() and not (helper.is_dir() and ours(helper)):
            raise OutputError(f"{helper}: mmaudio-lora keeps its working files there, and this is not one of its "
                              "folders (no marker); move or rename it, then run again")


def recover(out: Path) -> None:
    """Finish a swap a killed run left half done: the previous output comes back."""
    check_helpers(out)
    old = sibling(out, "old")
    if old.exists() and not out.exists():
        os.replace(old, out)
    elif old.exists():
        shutil.rmtree(old)


def read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def load_rows(out: Path):
    """The previous output's memmap (TensorDict), or None."""
    from tensordict import TensorDict

    if not (out / MEMMAP_DIR / "meta.json").is_file():
        return None
    return TensorDict.load_memmap(out / MEMMAP_DIR)


class WorkCache:
    """Encoded clips waiting to be assembled, one safetensors file per fingerprint."""

    def __init__(self, out: Path):
        self.root = sibling(out, "work")
        if not self.root.exists():
            mark_folder(self.root, "scratch")

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        return self._path(kind, key).is_file()

    def put(self, kind: str, key: str, tensors: dict) -> None:
        from safetensors.torch import save_file

        require_space(self.root, sum(t.numel() * t.element_size() for t in tensors.values()), "an encoded clip")
        with atomic_path(self._path(kind, key)) as temporary:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary))

    def get(self, kind: str, key: str, names: tuple[str, ...] | None = None) -> dict:
        """A clip's tensors (only `names`, when given: the file is read lazily)."""
        from safetensors import safe_open

        with safe_open(str(self._path(kind, key)), "pt") as handle:
            return {name: handle.get_tensor(name) for name in (names or handle.keys())}

    def put_skip(self, key: str, reason: str) -> None:
        atomic_write_text(self.root / "skip" / f"{key}.txt", reason)

    def skip_reason(self, key: str) -> str | None:
        path = self.root / "skip" / f"{key}.txt"
        return path.read_text() if path.is_file() else None

    def clear(self) -> None:
        if ours(self.root):
            shutil.rmtree(self.root, ignore_errors=True)


def write_output(out: Path, rows: list[dict], shapes: dict[str, tuple[int, ...]], fetch, manifest: dict,
                 skipped_lines: list[str]) -> None:
    """Assemble the new output in a staging folder, then swap it in for `out`.

    `rows` hold id, label and group; `fetch(i)` gives row i's tensors by key.
    """
    import torch
    from tensordict import TensorDict

    staging = sibling(out, "staging")
    if staging.exists():  # a killed run's: ours (check_helpers ran first)
        shutil.rmtree(staging)
    mark_folder(staging, "scratch")
    count = len(rows)
    per_row = sum(4 * math.prod(shape) for shape in shapes.values())  # float32
    require_space(staging, count * per_row, f"the feature memmap ({count} clips)")
    template = TensorDict({key: torch.zeros(()).expand(count, *shape) for key, shape in shapes.items()},
                          batch_size=[count])
    memmap = template.memmap_like(prefix=staging / MEMMAP_DIR, num_threads=0)
    for index in range(count):
        for key, value in fetch(index).items():
            memmap[key][index] = value
    with open(staging / TSV_NAME, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(["id", "label", "group"])
        writer.writerows([row["id"], row["label"], row["group"]] for row in rows)
    (staging / SKIPPED_NAME).write_text("".join(line + "\n" for line in skipped_lines))
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    mark_folder(staging, "features")

    replace_folder(staging, out)
