"""Reading precomputed features: the ExtractedVGG contract (a memmap folder and an id/label TSV)."""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from shared.errors import UserError, is_plain_file_name
from shared.feature_files import MEMMAP_DIR, TSV_NAME




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
    trainer can mask padded latent frames.
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
    return rows


def _feature_tsv(directory: str | Path) -> Path:
    tsv = Path(directory) / TSV_NAME
    if not tsv.is_file():
        raise FeatureFormatError(f"{directory}: no {TSV_NAME}; is this a folder written by `mmaudio-lora features`?")
    return tsv


def feature_labels(directory: str | Path) -> dict[str, str]:
    """Each clip's caption (the `label` column), by id."""
    return {row["id"]: row.get("label") or "" for row in _read_rows(_feature_tsv(directory))}


def feature_ids(directory: str | Path) -> list[str]:
    """The clip ids of a feature folder, in row order, without opening the memmap."""
    return [row["id"] for row in _read_rows(_feature_tsv(directory))]


def feature_mode(directory: str | Path) -> str:
    """The audio mode a feature folder was computed for, from its latents' width (the VAE's)."""
    from shared.sequence import LATENT_DIMS

    _feature_tsv(directory)  # the folder's own files first: the clearest error for a wrong folder
    meta = Path(directory) / MEMMAP_DIR / "meta.json"
    try:
        latent_dim = json.loads(meta.read_text())["mean"]["shape"][-1]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise FeatureFormatError(f"{directory}: no readable {MEMMAP_DIR}/meta.json; is this a folder written by "
                                 "`mmaudio-lora features`?") from None
    modes = [mode for mode, width in LATENT_DIMS.items() if width == latent_dim]
    if not modes:
        raise FeatureFormatError(f"{directory}: latents of width {latent_dim} belong to no audio mode "
                                 f"({LATENT_DIMS})")
    return modes[0]


def open_feature_dir(directory: str | Path, data_dim: dict[str, int]) -> ExtractedFeatures:
    """The features a `mmaudio-lora features` run wrote to `directory`."""
    return ExtractedFeatures(_feature_tsv(directory), premade_mmap_dir=Path(directory) / MEMMAP_DIR, data_dim=data_dim)


@dataclass
class FeatureSet:
    """All clips of one or more feature folders, held as tensors (a few MB per clip): the view the
    trainer and the evaluator share, with the same split."""

    ids: list[str]
    tensors: dict[str, torch.Tensor]  # a_mean, a_std, clip/sync/text features, duration_sec

    @classmethod
    def load(cls, folders: list[str], data_dim: dict[str, int], window_sec: float) -> "FeatureSet":
        parts: list[ExtractedFeatures] = [open_feature_dir(folder, data_dim) for folder in folders]
        ids = [i for part in parts for i in part.ids]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise UserError(f"clip ids appear in several feature folders: {', '.join(duplicates[:5])}")
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
        return cls(ids, {k: v.float() for k, v in tensors.items()})

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: list[int]) -> "FeatureSet":
        index = torch.tensor(indices, dtype=torch.long)
        return FeatureSet([self.ids[i] for i in indices], {k: v[index] for k, v in self.tensors.items()})

    def batch(self, indices: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[index] for k, v in self.tensors.items()}


def split(ids: list[str], val_fraction: float, val_ids: list[str]) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split: the given ids, or a fraction chosen by a hash of
    each id (stable when clips are added or removed), at least one clip when the fraction > 0."""
    if val_ids:
        unknown = sorted(set(val_ids) - set(ids))
        if unknown:
            raise UserError(f"validation ids not in the features: {', '.join(unknown[:5])}")
        chosen = set(val_ids)
    elif val_fraction > 0 and len(ids) > 1:
        ranked = sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())
        chosen = set(ranked[:max(1, round(len(ids) * val_fraction))])
    else:
        chosen = set()
    train = [n for n, i in enumerate(ids) if i not in chosen]
    val = [n for n, i in enumerate(ids) if i in chosen]
    if not train:
        raise UserError("every clip is in the validation split; nothing left to train on")
    return train, val
