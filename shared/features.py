"""Reading precomputed features: the ExtractedVGG contract (a memmap folder and an id/label TSV)."""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from shared.errors import UserError, id_length_problem, is_plain_file_name
from shared.feature_files import MANIFEST_NAME, MEMMAP_DIR, TSV_NAME
from shared.models.sequence import MIN_CLIP_SEC

log = logging.getLogger(__name__)
_told_without_groups: set[str] = set()  # folders already named in this process (said once)


class FeatureFormatError(UserError):
    pass


def data_dim(seq, dims) -> dict[str, int]:
    """ExtractedVGG's `data_dim` from a SequenceConfig and the profile's FeatureDims."""
    return {"latent_seq_len": seq.latent_seq_len, "clip_seq_len": seq.clip_seq_len,
            "sync_seq_len": seq.sync_seq_len, "text_seq_len": seq.text_seq_len,
            "clip_dim": dims.clip, "sync_dim": dims.sync, "text_dim": dims.text}


class ExtractedFeatures(Dataset):
    """MMAudio's ExtractedVGG: same constructor, same checks, same item dictionary.

    Items also carry `duration_sec` when the memmap has it (our precompute writes it), so the
    trainer can mask padded latent frames. `groups` are the clips' source videos (the TSV's
    `group` column, which ExtractedVGG ignores); a folder without it makes each clip its own group.
    """

    def __init__(self, tsv_path: str | Path, *, premade_mmap_dir: str | Path, data_dim: dict[str, int]):
        from tensordict import TensorDict

        tsv_path, premade_mmap_dir = Path(tsv_path), Path(premade_mmap_dir)
        if not (premade_mmap_dir / "meta.json").is_file():
            raise FeatureFormatError(f"{premade_mmap_dir}: not a feature memmap (no meta.json); run "
                                     "`mmaudio-lora features` first")
        rows = _read_rows(tsv_path)
        self.ids = [row["id"] for row in rows]
        self.captions = [row["label"] for row in rows]
        self.has_groups = bool(rows) and "group" in rows[0]
        self.groups = [row.get("group") or row["id"] for row in rows]
        td = TensorDict.load_memmap(premade_mmap_dir)
        self.mean, self.std = td["mean"], td["std"]
        self.clip_features, self.sync_features = td["clip_features"], td["sync_features"]
        self.text_features = td["text_features"]
        self.duration_sec = td["duration_sec"] if "duration_sec" in td.keys() else None

        expected = {
            "mean": (data_dim["latent_seq_len"], None), "std": (data_dim["latent_seq_len"], None),
            "clip_features": (data_dim["clip_seq_len"], data_dim["clip_dim"]),
            "sync_features": (data_dim["sync_seq_len"], data_dim["sync_dim"]),
            "text_features": (data_dim["text_seq_len"], data_dim["text_dim"]),
        }
        for key, (length, width) in expected.items():
            shape = tuple(td[key].shape)
            if shape[1] != length or (width is not None and shape[2] != width):
                raise FeatureFormatError(
                    f"{premade_mmap_dir}: {key} has shape {shape}, the model expects (N, {length}, "
                    f"{width if width is not None else '*'}); were these features made for another mode, "
                    "window or profile?")
        if td["mean"].shape[0] != len(rows):
            raise FeatureFormatError(f"{tsv_path}: {len(rows)} rows but the memmap holds {td['mean'].shape[0]}")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        item = {
            "id": self.ids[index],
            "a_mean": self.mean[index],
            "a_std": self.std[index],
            "clip_features": self.clip_features[index],
            "sync_features": self.sync_features[index],
            "text_features": self.text_features[index],
            "caption": self.captions[index],
            "video_exist": torch.tensor(True),
            "text_exist": torch.tensor(True),
        }
        if self.duration_sec is not None:
            item["duration_sec"] = self.duration_sec[index]
        return item


def _read_rows(tsv_path: Path) -> list[dict[str, str]]:
    """The rows of a feature folder's clips.tsv; ids become file names, so each must be a plain one."""
    with open(tsv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    for line, row in enumerate(rows, start=2):
        if not is_plain_file_name(row.get("id") or ""):
            raise FeatureFormatError(f"{tsv_path}: row {line}: id {row.get('id')!r} is not a plain file name")
        if problem := id_length_problem(row["id"]):
            raise FeatureFormatError(f"{tsv_path}: row {line}: {problem}")
    return rows


def _feature_tsv(directory: str | Path) -> Path:
    tsv = Path(directory) / TSV_NAME
    if not tsv.is_file():
        raise FeatureFormatError(f"{directory}: no {TSV_NAME}; is this a folder written by `mmaudio-lora features`?")
    return tsv


def feature_labels(directory: str | Path) -> dict[str, str]:
    """Each clip's caption (the `label` column), by id."""
    return {row["id"]: row.get("label") or "" for row in _read_rows(_feature_tsv(directory))}


def feature_groups(directory: str | Path) -> dict[str, str]:
    """Each clip's source video (the `group` column; each clip its own without it), by id, in row order."""
    return {row["id"]: row.get("group") or row["id"] for row in _read_rows(_feature_tsv(directory))}


def feature_ids(directory: str | Path) -> list[str]:
    """The clip ids of a feature folder, in row order, without opening the memmap."""
    return [row["id"] for row in _read_rows(_feature_tsv(directory))]


def _memmap_shape(directory: str | Path, key: str) -> list[int]:
    _feature_tsv(directory)  # the folder's own files first: the clearest error for a wrong folder
    meta = Path(directory) / MEMMAP_DIR / "meta.json"
    try:
        shape = json.loads(meta.read_text())[key]["shape"]
        if not isinstance(shape, list) or len(shape) < 2:
            raise ValueError
        return shape
    except (OSError, ValueError, KeyError, TypeError):
        raise FeatureFormatError(f"{directory}: no readable {MEMMAP_DIR}/meta.json; is this a folder written by "
                                 "`mmaudio-lora features`?") from None


def feature_mode(directory: str | Path) -> str:
    """The audio mode a feature folder was computed for, from its latents' width (the VAE's)."""
    from shared.models.sequence import LATENT_DIMS

    latent_dim = _memmap_shape(directory, "mean")[-1]
    modes = [mode for mode, width in LATENT_DIMS.items() if width == latent_dim]
    if not modes:
        raise FeatureFormatError(f"{directory}: latents of width {latent_dim} belong to no audio mode "
                                 f"({LATENT_DIMS})")
    return modes[0]


def feature_window(directory: str | Path) -> float:
    """The window (seconds) a feature folder was computed for, from its CLIP frames (8 per second)."""
    from shared.models.sequence import CLIP_FPS

    return _memmap_shape(directory, "clip_features")[1] / CLIP_FPS


def folders_window(folders: list[str]) -> float:
    """The window every feature folder was made for (they must agree)."""
    windows = {str(folder): feature_window(folder) for folder in folders}
    if len(set(windows.values())) > 1:
        raise FeatureFormatError(f"feature folders of different windows: {windows}; make them with the same "
                                 "`features --window`")
    return next(iter(windows.values()))


def open_feature_dir(directory: str | Path, data_dim: dict[str, int]) -> ExtractedFeatures:
    """The features a `mmaudio-lora features` run wrote to `directory`."""
    return ExtractedFeatures(_feature_tsv(directory), premade_mmap_dir=Path(directory) / MEMMAP_DIR, data_dim=data_dim)


@dataclass
class FeatureSet:
    """All clips of one or more feature folders, held as tensors (a few MB per clip): the view the
    trainer and the evaluator share, with the same split."""

    ids: list[str]
    tensors: dict[str, torch.Tensor]  # a_mean, a_std, clip/sync/text features, duration_sec
    groups: list[str]  # each clip's source video: validation holds out whole groups

    @classmethod
    def load(cls, folders: list[str], data_dim: dict[str, int], window_sec: float) -> "FeatureSet":
        parts: list[ExtractedFeatures] = [open_feature_dir(folder, data_dim) for folder in folders]
        ids = [i for part in parts for i in part.ids]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise UserError(f"clip ids appear in several feature folders: {', '.join(duplicates[:5])}")
        for folder, part in zip(folders, parts):
            if not part.has_groups and str(folder) not in _told_without_groups:
                _told_without_groups.add(str(folder))
                log.warning("%s: made before source videos were recorded (no `group` column): each clip counts as "
                            "its own source; run `mmaudio-lora features` again to hold out "
                            "whole source videos", folder)
        tensors = {
            "a_mean": torch.cat([p.mean[:] for p in parts]),
            "a_std": torch.cat([p.std[:] for p in parts]),
            "clip_features": torch.cat([p.clip_features[:] for p in parts]),
            "sync_features": torch.cat([p.sync_features[:] for p in parts]),
            "text_features": torch.cat([p.text_features[:] for p in parts]),
            # Folders without durations (made by another tool) count as full windows.
            "duration_sec": torch.cat([p.duration_sec[:] if p.duration_sec is not None
                                       else torch.full((len(p),), window_sec) for p in parts]),
        }
        short = [(i, float(d)) for i, d in zip(ids, tensors["duration_sec"].tolist()) if d < MIN_CLIP_SEC - 1e-6]
        if short:
            listed = ", ".join(f"{i} ({d:.2f} s)" for i, d in short[:5])
            raise FeatureFormatError(f"clips shorter than the {MIN_CLIP_SEC} s minimum: {listed}; run "
                                     "`mmaudio-lora features` again: it now leaves them out")
        return cls(ids, {k: v.float() for k, v in tensors.items()}, [g for part in parts for g in part.groups])

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def window_sec(self) -> float:
        """The window the features were made for (CLIP frames are taken at 8 per second)."""
        from shared.models.sequence import CLIP_FPS

        return self.tensors["clip_features"].shape[1] / CLIP_FPS

    def subset(self, indices: list[int]) -> "FeatureSet":
        index = torch.tensor(indices, dtype=torch.long)
        return FeatureSet([self.ids[i] for i in indices], {k: v[index] for k, v in self.tensors.items()},
                          [self.groups[i] for i in indices])

    def select(self, ids: list[str]) -> "FeatureSet":
        """The clips of `ids`, in this set's order; ids it lacks are named in the error."""
        missing = sorted(set(ids) - set(self.ids))
        if missing:
            raise FeatureFormatError(f"clip id(s) not in the features: {', '.join(missing[:5])}"
                                     + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        wanted = set(ids)
        return self.subset([n for n, i in enumerate(self.ids) if i in wanted])

    def batch(self, indices: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[index] for k, v in self.tensors.items()}


def source_hash(name: str) -> float:
    """A source's place in [0, 1), from its name alone: which sources are held out never depends on
    which others exist."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:15], 16) / 16 ** 15


def split(ids: list[str], groups: list[str], val_fraction: float, val_ids: list[str] = (),
          val_groups: list[str] = ()) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split that holds out whole groups (source videos), so no
    segment of a validation source is trained on. `val_ids`, else `val_groups`, else each source
    whose name hashes below `val_fraction` (at least one, never all): adding sources later never
    moves one that was there before from one side to the other."""
    if val_ids:
        unknown = sorted(set(val_ids) - set(ids))
        if unknown:
            raise UserError(f"validation ids not in the features: {', '.join(unknown[:5])}")
        chosen = set(val_ids)
    elif val_groups:
        unknown = sorted(set(val_groups) - set(groups))
        if unknown:
            raise UserError(f"validation groups not in the features: {', '.join(unknown[:5])}")
        chosen = {i for i, g in zip(ids, groups) if g in set(val_groups)}
    elif val_fraction > 0:
        sources = sorted(set(groups), key=source_hash)
        if len(sources) < 2:
            log.warning("every clip comes from one source video: no source can be held out, so the run has no "
                        "validation split (name clips with val_ids to validate on some of its segments)")
            held = set()
        else:
            held = {g for g in sources if source_hash(g) < val_fraction} or {sources[0]}
            if len(held) == len(sources):
                held.discard(sources[-1])
        chosen = {i for i, g in zip(ids, groups) if g in held}
    else:
        chosen = set()
    train = [n for n, i in enumerate(ids) if i not in chosen]
    val = [n for n, i in enumerate(ids) if i in chosen]
    if not train:
        raise UserError("every clip is in the validation split; nothing left to train on")
    return train, val


def source_folds(ids: list[str], groups: list[str], folds: int) -> list[list[str]]:
    """`folds` sets of whole sources, balanced by clip count (largest sources first, each to the
    fold with the fewest clips so far; ties by a hash of the name): deterministic."""
    members: dict[str, list[str]] = {}
    for clip_id, group in zip(ids, groups):
        members.setdefault(group, []).append(clip_id)
    if not 2 <= folds <= len(members):
        raise UserError(f"--folds {folds}: needs 2 to {len(members)} (the number of source videos)")
    assigned: list[list[str]] = [[] for _ in range(folds)]
    for group in sorted(members, key=lambda g: (-len(members[g]), source_hash(g))):
        min(assigned, key=len).extend(members[group])
    return [sorted(fold, key=ids.index) for fold in assigned]


CONTENT_KEYS = ("mean", "std", "clip_features", "sync_features", "text_features", "duration_sec")


def clip_digest(tensors: dict[str, torch.Tensor], caption: str) -> str:
    """One clip as the trainer reads it: its caption and its tensors' float32 values."""
    digest = hashlib.sha1(caption.encode("utf-8"))
    for key in CONTENT_KEYS:
        if key in tensors:
            value = tensors[key].to(torch.float32).contiguous()
            digest.update(f"{key}{tuple(value.shape)}".encode())
            digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def feature_fingerprint(directory: str | Path) -> str:
    """What the trainer reads from a feature folder, in one digest: each clip's id, caption and
    tensors, read from the folder itself (a few hundred MB hash in about a second). A column that
    only groups clips, or a re-encoding that gives the same values, changes nothing. Hashed once
    per process while the folder's files stay as they are (a crossval's folds all ask)."""
    directory = Path(directory).resolve()
    files = sorted(p for p in [_feature_tsv(directory), *(directory / MEMMAP_DIR).rglob("*")] if p.is_file())
    return _content_fingerprint(directory, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=32)
def _content_fingerprint(directory: Path, identity: tuple) -> str:
    from tensordict import TensorDict

    rows = _read_rows(_feature_tsv(directory))
    try:
        memmap = TensorDict.load_memmap(directory / MEMMAP_DIR)
    except Exception:  # not a memmap folder (tensordict raises several types)
        raise FeatureFormatError(f"{directory}: no readable {MEMMAP_DIR}/; is this a folder written by "
                                 "`mmaudio-lora features`?") from None
    pairs = [[row["id"], clip_digest({key: memmap[key][n] for key in CONTENT_KEYS if key in memmap.keys()},
                                     row.get("label") or "")] for n, row in enumerate(rows)]
    return "content:" + hashlib.sha1(json.dumps(pairs).encode()).hexdigest()[:16]


def legacy_fingerprints(directory: str | Path) -> set[str]:
    """The digests runs recorded before content fingerprints (the manifest's rows, with and without
    the group column), so such a run still recognises its unchanged features."""
    try:
        rows = json.loads((Path(directory) / MANIFEST_NAME).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    variants = [rows, [row[:2] + row[3:] if len(row) == 5 else row for row in rows]]
    return {hashlib.sha1(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16] for v in variants}
