"""Reading precomputed features: the ExtractedVGG contract (a memmap folder and an id/label TSV)."""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch.utils.data import Dataset

MEMMAP_DIR = "memmap"
TSV_NAME = "clips.tsv"


class FeatureFormatError(ValueError):
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
        with open(tsv_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
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


def open_feature_dir(directory: str | Path, data_dim: dict[str, int]) -> ExtractedFeatures:
    """The features a `mmaudio-lora features` run wrote to `directory`."""
    directory = Path(directory)
    if not (directory / TSV_NAME).is_file():
        raise FeatureFormatError(f"{directory}: no {TSV_NAME}; is this a folder written by `mmaudio-lora features`?")
    return ExtractedFeatures(directory / TSV_NAME, premade_mmap_dir=directory / MEMMAP_DIR, data_dim=data_dim)
