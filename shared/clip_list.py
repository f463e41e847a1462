"""Reading the clip list: MMAudio's `id, label` TSV or a segment TSV with paths and times.

Segment schema (no `id`): video_path, start_time, end_time, caption (+ any other columns).
MMAudio schema: id, label, videos at <video root>/<id>.mp4, the whole clip up to the window.

Each clip's group is the source video it was cut from, so that validation can hold out whole
sources and no segment of a held-out source is trained on:
- `original_video` and/or `title_folder` when the list has them; with both, clips that share
  either value are one source (the union: a title folder holding cuts of two originals, or one
  original cut into two folders, never straddles the split);
- otherwise the video's folder under the video root when the videos sit in folders (the
  documented `<title folder>/<segment>.mp4` layout), else the video file;
- in MMAudio's `id, label` lists each id is its own group.
`ClipList.grouping` says which rule was used.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from shared.errors import UserError, id_length_problem, is_plain_file_name


class ClipListError(UserError):
    """The list cannot be used as it is; the message names the file, the rows and the problem."""


@dataclass(frozen=True)
class ClipEntry:
    row: int  # line number in the TSV (the header is line 1)
    id: str
    video: Path
    start_sec: float
    end_sec: float | None  # None: up to the end of the file (or the window)
    caption: str
    group: str = ""  # the source video (see the module's docstring)
    original: str = ""  # the `original_video` column: the whole video the segment was cut from


GROUP_COLUMNS = ("original_video", "title_folder")


class ClipList(list):
    """The clips of a list in row order (a list of ClipEntry), and how their sources were found."""

    def __init__(self, entries: list[ClipEntry], grouping: str):
        super().__init__(entries)
        self.grouping = grouping


def safe_id(text: str) -> str:
    """A file-system-safe name made of `text` (ids and output names derived from paths)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "clip"


def _rows_message(problem: str, rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, rows[:limit])) + (f" (+{len(rows) - limit} more)" if len(rows) > limit else "")
    return f"{'row' if len(rows) == 1 else 'rows'} {shown}: {problem}"


def _resolve(video_root: Path, relative: str, allow_symlinks: bool) -> tuple[Path | None, str | None]:
    """The video's path under the root, or None and the reason it is refused."""
    root = video_root.resolve()
    written = Path(os.path.normpath(root / relative))
    if not (written == root or root in written.parents):
        return None, f"path escapes the video root {video_root}"
    path = written.resolve()
    if path == root or root in path.parents or allow_symlinks:
        return written, None  # as written: ids derive from it, and a link opens as its target
    return None, (f"a symbolic link leads outside the video root {video_root} (to {path}); "
                  "pass --allow-symlinks to accept linked data sets")


def _read_text(tsv: Path) -> str:
    data = tsv.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ClipListError(f"{tsv}: line {line} is not UTF-8 (byte 0x{data[error.start]:02x}); "
                            "save the list as UTF-8") from None


def read_clip_list(tsv: str | Path, video_root: str | Path, allow_symlinks: bool = False) -> ClipList:
    """Every clip of the list, validated; one ClipListError naming all the bad rows.

    The list is TSV as spreadsheets write it: a field in double quotes may hold tabs and quotes.
    """
    tsv, video_root = Path(tsv), Path(video_root)
    if not tsv.is_file():
        raise ClipListError(f"{tsv}: no such file")
    reader = csv.DictReader(io.StringIO(_read_text(tsv), newline=""), delimiter="\t")
    columns = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = columns
    records = list(reader)
    if "video_path" in columns:
        required = ["video_path", "start_time", "end_time"]
    elif "id" in columns:
        required = ["id"]
    else:
        raise ClipListError(f"{tsv}: needs either an `id` column (MMAudio's `id, label` lists) or "
                            f"`video_path, start_time, end_time`; found columns {columns}")
    missing = [c for c in required if c not in columns]
    caption_column = "caption" if "caption" in columns else "label" if "label" in columns else None
    if missing or caption_column is None:
        need = missing + ([] if caption_column else ["caption or label"])
        raise ClipListError(f"{tsv}: missing column(s) {', '.join(need)}; found {columns}")
    if not records:
        raise ClipListError(f"{tsv}: the list has no rows")

    problems: dict[str, list[int]] = {}
    clips, named_by = [], []  # named_by: each clip's group columns that have a value
    for line, record in enumerate(records, start=2):
        if None in record or None in record.values():
            problems.setdefault(f"not {len(columns)} tab-separated fields as in the header", []).append(line)
            continue
        record = {k: v.strip() for k, v in record.items()}
        if "video_path" in columns:
            relative = record["video_path"]
            try:
                start, end = float(record["start_time"]), float(record["end_time"])
                if not (math.isfinite(start) and math.isfinite(end)):
                    raise ValueError
            except ValueError:
                problems.setdefault("start_time/end_time is not a number", []).append(line)
                continue
            if end <= start:
                problems.setdefault("end_time is not after start_time", []).append(line)
                continue
            if start < 0:
                problems.setdefault("start_time is negative", []).append(line)
                continue
            clip_id = record.get("id", "")
            if clip_id and not is_plain_file_name(clip_id):
                problems.setdefault("id is not a plain file name (no /, \\ or leading .)", []).append(line)
                continue
        else:
            clip_id = record["id"]
            if not is_plain_file_name(clip_id):
                problems.setdefault("id is not a plain file name (no /, \\ or leading .)", []).append(line)
                continue
            relative, start, end = f"{clip_id}.mp4", 0.0, None
        group = _default_group(relative) if "video_path" in columns else clip_id
        if not relative:
            problems.setdefault("empty video path or id", []).append(line)
            continue
        video, refusal = _resolve(video_root, relative, allow_symlinks)
        if refusal is not None:
            problems.setdefault(refusal, []).append(line)
            continue
        clips.append(ClipEntry(line, clip_id, video, start, end, record[caption_column], group,
                               record.get("original_video", "")))
        named_by.append({c: record[c] for c in GROUP_COLUMNS if record.get(c)})
    if problems:
        raise ClipListError(f"{tsv}: " + "; ".join(_rows_message(p, rows) for p, rows in problems.items()))
    clips = _assign_ids(clips, video_root.resolve())
    too_long = [(clip.row, problem) for clip in clips if (problem := id_length_problem(clip.id))]
    if too_long:
        raise ClipListError(f"{tsv}: row {too_long[0][0]}: {too_long[0][1]}"
                            + (f" (+{len(too_long) - 1} more rows)" if len(too_long) > 1 else "")
                            + "; give the list an `id` column with shorter ids")
    duplicates: dict[str, list[int]] = {}
    for clip in clips:
        duplicates.setdefault(clip.id, []).append(clip.row)
    repeated = {i: rows for i, rows in duplicates.items() if len(rows) > 1}
    if repeated:
        detail = "; ".join(f"id {i!r} on rows {', '.join(map(str, rows))}" for i, rows in list(repeated.items())[:10])
        raise ClipListError(f"{tsv}: duplicate ids: {detail}")
    return _grouped(clips, named_by, columns)


def _default_group(relative: str) -> str:
    """A segment's source without group columns: its folder under the video root, else its file."""
    folder = os.path.dirname(os.path.normpath(relative))
    return folder if folder else relative


def _grouped(clips: list[ClipEntry], named_by: list[dict[str, str]], columns: list[str]) -> ClipList:
    """Each clip's group from the list's group columns: clips sharing a value of any of them are one
    source (connected through shared values); a clip without values keeps its default group."""
    present = [c for c in GROUP_COLUMNS if c in columns]
    if "video_path" not in columns:
        rule = "each id is its own source (MMAudio's id, label list)"
    elif present:
        rule = ("clips sharing an original_video or a title_folder are one source" if len(present) == 2
                else f"the {present[0]} column")
    else:
        rule = "the video's folder under the video root (else the video file)"
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def root(node: tuple[str, str]) -> tuple[str, str]:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for values in named_by:  # union: the values named on one row belong to one source
        nodes = [root(node) for node in sorted(values.items())]
        for node in nodes[1:]:
            parent[root(node)] = root(nodes[0])

    def component(values: dict[str, str]) -> tuple[str, str]:
        return root(min(values.items()))

    members: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for values in named_by:
        if values:
            members.setdefault(component(values), set()).update(values.items())
    names = {key: _source_name(nodes) for key, nodes in members.items()}
    grouped = [replace(clip, group=names[component(values)]) if values else clip
               for clip, values in zip(clips, named_by)]
    return ClipList(grouped, rule)


def _source_name(nodes: set[tuple[str, str]]) -> str:
    """A source's name: its first original_video (alphabetically), else its first title_folder."""
    originals = [value for column, value in nodes if column == "original_video"]
    return min(originals or [value for _, value in nodes])


def _assign_ids(clips: list[ClipEntry], root: Path) -> list[ClipEntry]:
    """Derive a stable, filesystem-safe id where the list gives none: the path (and the times,
    when one file has several segments); a short hash of the path settles rare collisions."""
    per_file: dict[Path, int] = {}
    for clip in clips:
        per_file[clip.video] = per_file.get(clip.video, 0) + 1
    derived = []
    for clip in clips:
        if clip.id:
            derived.append(clip)
            continue
        stem = safe_id(str(clip.video.relative_to(root).with_suffix("")).replace("/", "__"))
        if per_file[clip.video] > 1:
            stem += f"_{clip.start_sec:g}-{clip.end_sec:g}s"
        derived.append(replace(clip, id=stem))
    counts: dict[str, int] = {}
    for clip in derived:
        counts[clip.id] = counts.get(clip.id, 0) + 1
    return [replace(c, id=f"{c.id}_{hashlib.sha1(str(c.video).encode()).hexdigest()[:6]}")
            if counts[c.id] > 1 and not original.id else c
            for c, original in zip(derived, clips)]


def split_into_windows(clip: ClipEntry, window_sec: float, min_last_sec: float = 1.0) -> list[ClipEntry]:
    """Consecutive windows of a long segment (`--split-long`); a last piece shorter than
    `min_last_sec` is dropped (too little to learn from once padded)."""
    if clip.end_sec is None or clip.end_sec - clip.start_sec <= window_sec + 1e-6:
        return [clip]
    pieces, start, index = [], clip.start_sec, 0
    while clip.end_sec - start > 1e-6:
        end = min(clip.end_sec, start + window_sec)
        if end - start >= min_last_sec or index == 0:
            pieces.append(replace(clip, id=f"{clip.id}_w{index}", start_sec=start, end_sec=end))
        start, index = end, index + 1
    return pieces
