"""`features`: decide what changed, encode only that, and replace the output atomically.

Each clip has two fingerprints: the media key (file identity, time range, mode, window, profile and
the video/audio encoders' weights) decides its audio and video features; the text key (caption
and CLIP's weights) decides its text features. Features whose key is already in the previous
output or in the work folder are reused, so a caption edit only runs the text encoder and an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from shared.clip_list import ClipEntry, ClipListError, read_clip_list, split_into_windows
from shared.errors import UserError
from shared.models.sequence import MIN_CLIP_SEC
from precompute.store import (
    FORMAT_VERSION,
    MEDIA_KEYS,
    TEXT_KEY,
    WorkCache,
    load_rows,
    read_manifest,
    recover,
    write_output,
)
from shared.outputs import check_output_folder, folder_lock
from shared.progress import progress as progress_bar
from shared.runtime import Runtime, check_window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureJob:
    tsv: Path
    video_root: Path
    out: Path
    runtime: Runtime  # the encoders' mode, profile, weights, device and precision
    window_sec: float = 8.0
    strict: bool = False
    split_long: bool = False
    batch_size: int = 8
    workers: int | None = None  # decoding processes; None: one per core but one, at most 12
    allow_symlinks: bool = False


@dataclass
class Item:
    entry: ClipEntry  # its row of the clip list
    media_key: str
    text_key: str


@dataclass
class FeatureSummary:
    out: Path
    clips: int = 0
    up_to_date: bool = False
    encoded_media: int = 0
    encoded_text: int = 0
    padded: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    models_loaded: list[str] = field(default_factory=list)
    sources: int = 0  # source videos (groups) among the clips
    grouping: str = ""  # the rule that found them (shared/clip_list.py)
    main_process: bool = True  # False on the other ranks of a torchrun job: rank 0 reports

    @property
    def encoding_seconds(self) -> float:
        return sum(self.timings.get(stage, 0.0) for stage in ENCODER_STAGES)

    @property
    def clips_per_second(self) -> float:
        return self.encoded_media / self.seconds if self.seconds else 0.0


ENCODER_STAGES = ("clip frames", "synchformer", "vae", "clip text")


def default_workers() -> int:
    """Decoding keeps every core but one busy (the main process feeds the encoders)."""
    return max(1, min(12, (os.cpu_count() or 2) - 1))


class StrictModeError(UserError, RuntimeError):
    pass


def _digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _file_identity(path: Path) -> list:
    try:
        stat = path.stat()
    except OSError:
        return [str(path), "missing"]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def plan(job: FeatureJob, encoder_weights: dict[str, str]) -> tuple[list[Item], str]:
    """Every output row with its fingerprints, and how the clips' sources were found; cheap (reads
    the list and stats the files)."""
    entries = read_clip_list(job.tsv, job.video_root, job.allow_symlinks)
    grouping = entries.grouping
    if job.split_long:
        from shared.media import probe_duration

        entries = [piece for entry in entries
                   for piece in split_into_windows(entry if entry.end_sec is not None else
                                                   _with_probed_end(entry, probe_duration), job.window_sec)]
        _refuse_repeated_ids(entries, job.tsv)
    # "synchformer fp32": sync features are float32 whatever --precision says (DeSync reads them as
    # av-benchmark computes them); folders made when bf16 was used re-encode once.
    settings = [FORMAT_VERSION, job.runtime.mode, job.window_sec, job.runtime.profile, "synchformer fp32"]
    return [Item(entry,
                 media_key=_digest(settings, encoder_weights["clip"], encoder_weights["synchformer"],
                                   encoder_weights["vae"], _file_identity(entry.video), entry.start_sec, entry.end_sec),
                 text_key=_digest(FORMAT_VERSION, job.runtime.profile, encoder_weights["clip"], entry.caption))
            for entry in entries], grouping


def _refuse_repeated_ids(entries: list[ClipEntry], tsv: Path) -> None:
    """Windows of a long clip are named <id>_w<k>: one may take the id of another row."""
    rows: dict[str, list[int]] = {}
    for entry in entries:
        rows.setdefault(entry.id, []).append(entry.row)
    repeated = {clip_id: sorted(set(lines)) for clip_id, lines in rows.items() if len(lines) > 1}
    if repeated:
        clip_id, lines = next(iter(repeated.items()))
        raise ClipListError(f"{tsv}: with --split-long, id {clip_id!r} names a window of one row and another row "
                            f"(rows {', '.join(map(str, lines))}); rename the row's id")


def _with_probed_end(entry: ClipEntry, probe_duration) -> ClipEntry:
    duration = probe_duration(entry.video)
    return entry if duration is None else replace(entry, end_sec=duration)


def _entries(items: list[Item]) -> list[list[str]]:
    return [[item.entry.id, item.entry.caption, item.entry.group, item.media_key, item.text_key] for item in items]


def run_features(job: FeatureJob, show_progress: bool = True) -> FeatureSummary:
    """Bring `job.out` up to date with the list; refuses an output folder that is not ours."""
    check_window(job.window_sec)
    out = check_output_folder(job.out, "features", protected=(Path(job.video_root), Path(job.tsv)))
    with folder_lock(out, "features"):
        return _run_locked(replace(job, out=out), show_progress)


def _run_locked(job: FeatureJob, show_progress: bool) -> FeatureSummary:
    """Plan → (nothing changed: done) → encode what is missing → assemble and swap in the output."""
    started = time.perf_counter()
    recover(job.out)
    encoder_weights = job.runtime.encoder_weights()
    items, grouping = plan(job, encoder_weights)
    sources = len({item.entry.group for item in items})
    manifest = read_manifest(job.out)
    if (manifest is not None and manifest.get("entries") == _entries(items)
            and manifest.get("weights") == encoder_weights and manifest.get("min_clip_sec") == MIN_CLIP_SEC
            and "padded" in manifest):
        skipped = manifest.get("skipped", [])
        if job.strict and skipped:
            raise StrictModeError(f"{len(skipped)} clip(s) are skipped and --strict is set (nothing changed since "
                                  f"the last run). First: {skipped[0]}")
        return FeatureSummary(out=job.out, clips=len(items), up_to_date=True, skipped=skipped,
                              padded=manifest["padded"], seconds=time.perf_counter() - started, sources=sources,
                              grouping=grouping)

    from shared.distributed import Ranks

    ranks = Ranks.from_environment(job.runtime.device)
    with ranks:
        if ranks.device is not None:
            job = replace(job, runtime=job.runtime.on(ranks.device))
        job.runtime.torch_device  # an unusable --device is refused before the work folder exists
        previous = PreviousOutput.read(job.out, manifest)
        cache = WorkCache(job.out)
        encoded = _encode_missing(job, items, previous, cache, ranks, show_progress)
        summary = FeatureSummary(out=job.out, clips=len(items), encoded_media=encoded.media,
                                 encoded_text=encoded.text, timings=encoded.timings, models_loaded=encoded.models,
                                 sources=sources, grouping=grouping, main_process=ranks.is_main)
        if ranks.is_main:
            written = time.perf_counter()
            summary.skipped, summary.padded = _assemble(job, items, encoder_weights, previous, cache, grouping)
            summary.timings["write"] = time.perf_counter() - written
    summary.seconds = time.perf_counter() - started
    return summary


@dataclass
class PreviousOutput:
    """The output of an earlier run, where its features can be reused from: rows by fingerprint."""
    rows: object | None = None  # its memmap (TensorDict), or None
    media_row: dict[str, int] = field(default_factory=dict)  # media key → row
    text_row: dict[str, int] = field(default_factory=dict)  # text key → row

    @classmethod
    def read(cls, out: Path, manifest: dict | None) -> "PreviousOutput":
        rows = load_rows(out) if manifest else None
        if rows is None:
            return cls()
        entries = manifest.get("rows", [])
        # rows end with (media key, text key), whatever columns come before them
        return cls(rows, {e[-2]: i for i, e in enumerate(entries)}, {e[-1]: i for i, e in enumerate(entries)})

    def duration(self, item: Item, cache: WorkCache) -> float:
        """One clip's real duration, without reading its features."""
        if item.media_key in self.media_row:
            return float(self.rows["duration_sec"][self.media_row[item.media_key]])
        return float(cache.get("media", item.media_key, ("duration_sec",))["duration_sec"])

    def features(self, item: Item, cache: WorkCache) -> dict:
        """One clip's tensors: from this output where its fingerprints match, else from the work folder."""
        if item.media_key in self.media_row:
            media = {k: self.rows[k][self.media_row[item.media_key]] for k in MEDIA_KEYS}
        else:
            media = cache.get("media", item.media_key)
        if item.text_key in self.text_row:
            text = self.rows[TEXT_KEY][self.text_row[item.text_key]]
        else:
            text = cache.get("text", item.text_key)[TEXT_KEY]
        return dict(media, **{TEXT_KEY: text})


@dataclass
class Encoded:
    media: int  # clips whose video and audio were encoded now (all ranks)
    text: int  # captions encoded now
    timings: dict[str, float]
    models: list[str]


def _encode_missing(job: FeatureJob, items: list[Item], previous: PreviousOutput, cache: WorkCache, ranks,
                    show_progress: bool) -> Encoded:
    """Encode what neither the previous output nor the work folder holds; each rank its share."""
    from precompute.encode import FeatureEncoder

    media_todo = _unique([i for i in items if i.media_key not in previous.media_row
                          and not cache.has("media", i.media_key) and cache.skip_reason(i.media_key) is None],
                         "media_key")
    text_todo = _unique([i for i in items if i.text_key not in previous.text_row and not cache.has("text", i.text_key)],
                        "text_key")
    ranks.barrier()  # every rank has listed the work before any rank adds to the work folder
    encoder = FeatureEncoder(job.runtime)
    media = _encode_media(job, ranks.shard(media_todo), encoder, cache, show_progress, ranks.rank)
    text = _encode_text(ranks.shard(text_todo), encoder, cache, job.batch_size)
    # These collectives also wait for every rank to finish encoding before rank 0 assembles.
    timings = dict(encoder.seconds, **{"load models": job.runtime.load_seconds})
    return Encoded(ranks.total(media), ranks.total(text), timings, job.runtime.loaded_models)


def _assemble(job: FeatureJob, items: list[Item], encoder_weights: dict, previous: PreviousOutput,
              cache: WorkCache, grouping: str) -> tuple[list[str], int]:
    """Write the new output (kept clips, manifest, skip report) and swap it in: (skip lines, padded clips)."""
    from shared import __version__

    kept, skipped, padded = [], [], 0
    for item in items:
        reason = None if item.media_key in previous.media_row else cache.skip_reason(item.media_key)
        if reason is None:
            seconds = previous.duration(item, cache)
            if seconds < MIN_CLIP_SEC - 1e-6:
                reason = (f"only {seconds:.2f} s of picture and sound, shorter than the {MIN_CLIP_SEC:g} s minimum "
                          "(one Synchformer window)")
        if reason is None:
            kept.append(item)
            padded += seconds < job.window_sec - 1e-3
        else:
            skipped.append(f"row {item.entry.row} ({item.entry.id}): {item.entry.video}: {reason}")
    for line in skipped:
        log.warning("skipped %s", line)
    if job.strict and skipped:
        raise StrictModeError(f"{len(skipped)} clip(s) skipped and --strict is set; the previous output "
                              f"is unchanged. First: {skipped[0]}")
    if not kept:
        raise StrictModeError("no clip could be encoded; the previous output is unchanged")

    def fetch(index: int) -> dict:
        return previous.features(kept[index], cache)

    manifest = {
        "tool": "mmaudio-lora", "tool_version": __version__, "format_version": FORMAT_VERSION,
        "profile": job.runtime.profile, "mode": job.runtime.mode, "window_sec": job.window_sec,
        "min_clip_sec": MIN_CLIP_SEC, "weights": encoder_weights, "grouping": grouping,
        "entries": _entries(items), "rows": _entries(kept), "skipped": skipped, "padded": padded,
        "clips": [{"id": i.entry.id, "row": i.entry.row, "video": str(i.entry.video), "start_sec": i.entry.start_sec,
                   "end_sec": i.entry.end_sec, "group": i.entry.group, "media_key": i.media_key,
                   "text_key": i.text_key} for i in kept],
    }
    manifest["same_clips_as"] = _lineage(job.out, previous, kept, fetch)
    shapes = {key: tuple(value.shape) for key, value in fetch(0).items()}
    write_output(job.out, [{"id": i.entry.id, "label": i.entry.caption, "group": i.entry.group} for i in kept], shapes,
                 fetch, manifest, skipped)
    cache.clear()
    return skipped, padded


SYNC_REENCODED = "the same clips; Synchformer features re-encoded in float32 (an earlier version's were bf16 on a GPU)"


def _lineage(out: Path, previous: PreviousOutput, kept: list[Item], fetch) -> dict[str, str]:
    """Earlier contents of this folder that held the clips it is about to hold: {fingerprint: why}.
    The folder it replaces counts when its ids, captions, durations, latents, CLIP and text features
    are the new ones (within bf16 rounding) and only the Synchformer features differ: what
    re-running `features` on a folder of an earlier version does. A run made on it then continues
    on this one (shared/run_record.py). Carried over from the manifest it replaces."""
    import torch

    from shared.features import FeatureFormatError, feature_fingerprint, feature_labels

    manifest = read_manifest(out)
    earlier = dict((manifest or {}).get("same_clips_as", {}))
    if previous.rows is None:
        return earlier
    try:
        labels = feature_labels(out)
        fingerprint = feature_fingerprint(out)
    except (FeatureFormatError, OSError):
        return earlier
    if list(labels) != [i.entry.id for i in kept] or list(labels.values()) != [i.entry.caption for i in kept]:
        return {}
    for row in range(len(kept)):
        new = fetch(row)
        for key, value in new.items():
            if key == "sync_features":
                continue
            old = previous.rows[key][row].float()
            if old.shape != value.shape or not torch.allclose(old, value.float(), rtol=1e-2, atol=1e-3):
                return {}
    return {**earlier, fingerprint: SYNC_REENCODED}


def _unique(items: list[Item], key: str) -> list[Item]:
    seen, unique = set(), []
    for item in items:
        if getattr(item, key) not in seen:
            seen.add(getattr(item, key))
            unique.append(item)
    return unique


def _encode_media(job: FeatureJob, todo: list[Item], encoder, cache: WorkCache, show_progress: bool,
                  rank: int = 0) -> int:
    """Decode in DataLoader workers, encode in batches, store each clip as soon as it is done.

    When a worker dies (a file that crashes the decoder), the clips it may have been decoding are
    tried again one at a time in a worker of their own; the one that crashes again is skipped. A
    worker that died of full shared memory stops the run with that cause named.
    """
    if not todo:
        return 0
    from precompute.decode import clips_in_flight, free_shared_memory, out_of_shared_memory, plan_decoding

    markers = cache.root / "decoding" / f"rank-{rank}"  # a rank reads only its own workers' markers
    markers.mkdir(parents=True, exist_ok=True)
    plan = plan_decoding(default_workers() if job.workers is None else job.workers, job.batch_size,
                         job.runtime.mode, job.window_sec)
    encoded = 0
    with progress_bar(total=len(todo), desc="encoding clips", unit="clip", disable=not show_progress) as progress:
        pending = todo
        while pending:
            try:
                encoded += _decode_and_encode(job, pending, encoder, cache, markers, plan, progress)
                break
            except RuntimeError as error:
                if plan.workers == 0 or "DataLoader worker" not in str(error):
                    raise
                if out_of_shared_memory(error):
                    free = free_shared_memory()
                    raise UserError("the decoding workers ran out of shared memory (/dev/shm"
                                    + (f", {free / 1e6:.0f} MB free now" if free is not None else "") + "): pass "
                                    "--workers 1 or a smaller --batch-size, or give the container more shared memory "
                                    "(docker run --shm-size=8g)") from None
                suspects = [pending[i] for i in clips_in_flight(markers)]
                if not suspects:
                    raise
                log.warning("a decoding worker died (%s); trying %d clip(s) one by one",
                            str(error).splitlines()[0], len(suspects))
                for item in suspects:
                    try:
                        encoded += _decode_and_encode(job, [item], encoder, cache, markers, replace(plan, workers=1),
                                                      progress)
                    except RuntimeError as again:
                        if "DataLoader worker" not in str(again):
                            raise
                        clips_in_flight(markers)
                        cache.put_skip(item.media_key, "the decoder crashed on this file (its process died)")
                        progress.update(1)
                pending = [i for i in pending if not cache.has("media", i.media_key)
                           and cache.skip_reason(i.media_key) is None]
    return encoded


def _decode_and_encode(job: FeatureJob, todo: list[Item], encoder, cache: WorkCache, markers: Path, plan,
                       progress) -> int:
    from torch.utils.data import DataLoader

    from precompute.decode import SegmentDataset, collate_segments

    dataset = SegmentDataset([i.entry for i in todo], job.window_sec, job.runtime.mode, markers)
    loader = DataLoader(dataset, batch_size=job.batch_size, num_workers=plan.workers, prefetch_factor=plan.prefetch,
                        collate_fn=collate_segments)
    encoded = 0
    batches = iter(loader)
    try:
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            encoder.seconds["decode (waited for)"] += time.perf_counter() - waited
            if batch is None:
                break
            good = [(index, segment) for index, segment, _ in batch if segment is not None]
            for index, _, reason in batch:
                if reason is not None:
                    cache.put_skip(todo[index].media_key, reason)
            if good:
                features = encoder.encode_media([segment for _, segment in good])
                for row, (index, _) in enumerate(good):
                    cache.put("media", todo[index].media_key, {k: v[row] for k, v in features.items()})
                encoded += len(good)
            progress.update(len(batch))
    finally:
        del batches  # the workers stop now, also when an error is on its way up (its traceback keeps this frame)
    return encoded


def _encode_text(todo: list[Item], encoder, cache: WorkCache, batch_size: int) -> int:
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        features = encoder.encode_text([item.entry.caption for item in chunk])
        for row, item in enumerate(chunk):
            cache.put("text", item.text_key, {TEXT_KEY: features[row]})
    return len(todo)
