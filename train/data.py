"""The training view of precomputed features: several folders as one set, a fixed split, batches."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from shared.features import ExtractedFeatures, open_feature_dir

FIELDS = ("a_mean", "a_std", "clip_features", "sync_features", "text_features")


@dataclass
class FeatureSet:
    """All clips of one or more feature folders, held as tensors (a few MB per clip)."""

    ids: list[str]
    tensors: dict[str, torch.Tensor]  # a_mean, a_std, clip/sync/text features, duration_sec

    @classmethod
    def load(cls, folders: list[str], data_dim: dict[str, int], window_sec: float) -> "FeatureSet":
        parts: list[ExtractedFeatures] = [open_feature_dir(folder, data_dim) for folder in folders]
        ids = [i for part in parts for i in part.ids]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"clip ids appear in several feature folders: {', '.join(duplicates[:5])}")
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
            raise ValueError(f"validation ids not in the features: {', '.join(unknown[:5])}")
        chosen = set(val_ids)
    elif val_fraction > 0 and len(ids) > 1:
        ranked = sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())
        chosen = set(ranked[:max(1, round(len(ids) * val_fraction))])
    else:
        chosen = set()
    train = [n for n, i in enumerate(ids) if i not in chosen]
    val = [n for n, i in enumerate(ids) if i in chosen]
    if not train:
        raise ValueError("every clip is in the validation split; nothing left to train on")
    return train, val


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one epoch: a function of (seed, epoch) only, so resuming repeats it."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
