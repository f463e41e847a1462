"""What a training run records about itself, read back by train (--resume), generate, evaluate
and export: its settings (`config.json`) and its data (`split.json`).

    config.json  the resolved configuration, paths absolute (train/config.py's fields)
    split.json   train_ids, val_ids, group_of (id → source video) and feature_folders (each folder's
                 fingerprint when the run started): the run's split, the only one evaluate uses
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.errors import UserError
from shared.outputs import atomic_write_text

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"


class RunRecordError(UserError):
    """A run folder whose records are missing or unreadable; the message names the file."""


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from `path`, or one line naming the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunRecordError(f"{path}: no such file ({what})") from None
    except UnicodeDecodeError:
        raise RunRecordError(f"{path}: not a text file ({what})") from None
    except ValueError as error:
        raise RunRecordError(f"{path}: not valid JSON ({error}); it is {what}") from None
    if not isinstance(data, dict):
        raise RunRecordError(f"{path}: holds {type(data).__name__}, not the object {what} should be")
    return data


def read_run_config(run: str | os.PathLike) -> dict:
    """The settings a training run recorded, checked for the keys every reader needs."""
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        raise RunRecordError(f"{run}: not a training run folder (no {CONFIG_FILE})")
    settings = read_json(path, "the run's recorded settings")
    missing = [key for key in ("features", "profile") if key not in settings]
    if missing:
        raise RunRecordError(f"{path}: lacks {', '.join(missing)}; was it written by `mmaudio-lora train`?")
    if not isinstance(settings["features"], list) or not all(isinstance(f, str) for f in settings["features"]):
        raise RunRecordError(f"{path}: `features` should be a list of folders")
    return settings


@dataclass
class Split:
    """The clips a run trained and validated on, and the feature folders they came from."""

    train_ids: list[str]
    val_ids: list[str]
    group_of: dict[str, str]  # clip id → its source video (group)
    feature_folders: dict[str, str] = field(default_factory=dict)  # absolute folder → fingerprint at the start

    def save(self, run: Path) -> None:
        atomic_write_text(Path(run) / SPLIT_FILE, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, run: str | os.PathLike) -> "Split | None":
        """The recorded split, or None for a run made before splits were recorded."""
        path = Path(run) / SPLIT_FILE
        if not path.is_file():
            return None
        data = read_json(path, "the run's train/validation split")
        try:
            split = cls(list(data["train_ids"]), list(data["val_ids"]), dict(data["group_of"]),
                        dict(data.get("feature_folders", {})))
        except (KeyError, TypeError, ValueError):
            raise RunRecordError(f"{path}: needs train_ids, val_ids and group_of") from None
        return split

    def groups(self, ids: list[str]) -> set[str]:
        return {self.group_of.get(i, i) for i in ids}

    def describe_validation(self) -> str:
        """e.g. 'validation: 8 clips from 2 source videos (none of their segments in training)'."""
        if not self.val_ids:
            return "validation: none (no validation split)"
        held, trained = self.groups(self.val_ids), self.groups(self.train_ids)
        shared = held & trained
        overlap = ("none of their segments in training" if not shared else
                   f"{len(shared)} of them also have segments in training")
        return (f"validation: {len(self.val_ids)} clip{'s' if len(self.val_ids) != 1 else ''} from {len(held)} "
                f"source video{'s' if len(held) != 1 else ''} ({overlap})")

    def changes(self) -> list[str]:
        """One line per recorded feature folder that is gone or differs from when the run started."""
        from shared.features import FeatureFormatError, feature_fingerprint, feature_ids

        recorded = set(self.train_ids) | set(self.val_ids)
        present: dict[str, set[str]] = {}
        lines = []
        for folder in self.feature_folders:
            try:
                present[folder] = set(feature_ids(folder))
            except FeatureFormatError:
                lines.append(f"{folder}: the run's features are gone (moved or deleted)")
        missing = len(recorded - set().union(*present.values()))
        for folder, ids in present.items():
            if feature_fingerprint(folder) == self.feature_folders[folder]:
                continue
            added = len(ids - recorded)
            detail = ", ".join(part for part in (f"{added} clip(s) added" if added else "",
                                                 f"{missing} of the run's clips gone" if missing else "") if part)
            lines.append(f"{folder}: changed since the run started ({detail or 'clips re-encoded or captions edited'})")
        return lines
