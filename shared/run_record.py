"""What a training run records about itself, read back by train (--resume), generate, evaluate
and export: its settings (`config.json`) and its data (`split.json`).

    config.json  the resolved configuration, paths absolute (train/config.py's fields)
    metrics.jsonl one strict JSON object per logged step (step, train_loss, lr, val_loss, ...; a value
                 that is not finite is null)
    split.json   train_ids, val_ids, tuning_ids (held out for the run's choices, when it has them),
                 group_of (id → source video) and feature_folders (each folder's fingerprint when the
                 run started): the run's split, the only one evaluate uses
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from shared.errors import UserError
from shared.outputs import atomic_write_text

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
METRICS_FILE = "metrics.jsonl"
EVALUATION_FILE = "evaluation.json"  # evaluate's numbers (its report: evaluation/)
EMBEDDINGS_FILE = "embeddings.safetensors"  # a cross-validation fold's PaSST embeddings, beside its evaluation
LONG_EVALUATION_FILE = "long_evaluation.json"  # evaluate --long's numbers (its audio: long_evaluation/)


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


def finite_or_none(value):
    """`value` (nested dicts, lists) with every float that is not finite as None: JSON as the standard
    has it (null), never the bare NaN Python writes by default."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


CHECKPOINT_NAME = re.compile(r"step-(\d{6,})")  # what the trainer names its checkpoints, exactly
_left_alone: set[str] = set()  # folders already named in this process (said once)


def checkpoint_folders(run: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of the run's checkpoints, oldest first: only the names the trainer writes
    (`step-000250`). Anything else in checkpoints/ (a copy the user keeps) is never listed, rotated
    or read, and is named once."""
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        return []
    found, other = [], []
    for path in folder.iterdir():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
        elif str(path) not in _left_alone:
            _left_alone.add(str(path))
            other.append(path.name)
    if other:
        log.warning("%s: left alone (not checkpoints of ours): %s", folder, ", ".join(sorted(other)))
    return sorted(found)


def read_metrics_log(run: str | os.PathLike) -> list[dict]:
    """The run's logged steps, in order; lines that are not a JSON object with a step (the last
    line of a run killed while writing it) are left out and named in one warning."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        return []
    records, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad.append(number)
    if bad:
        log.warning("%s: line(s) %s are not complete records (a run stopped while writing?); left out", path,
                    ", ".join(map(str, bad[:5])))
    return records


_told_reencoded: set[tuple[str, str]] = set()


def _reencoded(folder: str, fingerprint: str) -> bool:
    """Whether `folder` holds the clips of the features a run recorded as `fingerprint`, re-encoded
    since (its manifest says so: `features` re-run on an earlier version's folder); said once."""
    from shared.feature_files import MANIFEST_NAME

    try:
        why = json.loads((Path(folder) / MANIFEST_NAME).read_text()).get("same_clips_as", {}).get(fingerprint)
    except (OSError, ValueError, AttributeError):
        return False
    if why and (folder, fingerprint) not in _told_reencoded:
        _told_reencoded.add((folder, fingerprint))
        log.warning("%s: re-encoded since the run started (%s); its split and clips are unchanged: continuing",
                    folder, why)
    return bool(why)


@dataclass
class Split:
    """The clips a run trained and validated on, and the feature folders they came from."""

    train_ids: list[str]
    val_ids: list[str]
    group_of: dict[str, str]  # clip id → its source video (group)
    feature_folders: dict[str, str] = field(default_factory=dict)  # absolute folder → fingerprint at the start
    # held out of training for the run's choices (best adapter, early stopping); empty: the
    # choices use the validation clips
    tuning_ids: list[str] = field(default_factory=list)

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
                        dict(data.get("feature_folders", {})), list(data.get("tuning_ids", [])))
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
        tuning = self.groups(self.tuning_ids)
        choices = (f"; the run's choices on {len(self.tuning_ids)} other held-out clip"
                   f"{'s' if len(self.tuning_ids) != 1 else ''} from {len(tuning)} training-side source"
                   f"{'s' if len(tuning) != 1 else ''}" if self.tuning_ids else "")
        return (f"validation: {len(self.val_ids)} clip{'s' if len(self.val_ids) != 1 else ''} from {len(held)} "
                f"source video{'s' if len(held) != 1 else ''} ({overlap}){choices}")

    def holds_features_of(self, recorded: str, folder: str) -> bool:
        """Whether `folder` holds what the recorded folder held when the run started."""
        from shared.features import FeatureFormatError, feature_fingerprint, legacy_fingerprints

        fingerprint = self.feature_folders[recorded]
        try:
            if fingerprint.startswith("content:"):
                return feature_fingerprint(folder) == fingerprint or _reencoded(folder, fingerprint)
            return fingerprint in legacy_fingerprints(folder)
        except (FeatureFormatError, OSError):
            return False

    def relocation(self, folders: list[str]) -> dict[str, str]:
        """Recorded feature folders that moved: {recorded: current} where a folder given now, and not
        recorded, holds the same features (a project folder moved or renamed)."""
        unclaimed = [f for f in folders if f not in self.feature_folders]
        moved = {}
        for recorded in self.feature_folders:
            if recorded in folders:
                continue
            found = next((f for f in unclaimed if self.holds_features_of(recorded, f)), None)
            if found is not None:
                moved[recorded] = found
                unclaimed.remove(found)
        return moved

    def relocated(self, folders: list[str]) -> "Split":
        """The same split with moved feature folders recorded where they are now."""
        moved = self.relocation(folders)
        return replace(self, feature_folders={moved.get(k, k): v for k, v in self.feature_folders.items()})

    def changes(self, folders: list[str] | None = None) -> list[str]:
        """One line per recorded feature folder that is gone or differs from when the run started
        (`folders`: the ones given now, among which a moved folder is found by its content)."""
        from shared.features import FeatureFormatError, feature_ids

        moved = self.relocation(folders) if folders is not None else {}
        recorded = set(self.train_ids) | set(self.val_ids) | set(self.tuning_ids)
        present: dict[str, tuple[str, set[str]]] = {}
        lines = []
        for folder in self.feature_folders:
            where = moved.get(folder, folder)
            try:
                present[folder] = (where, set(feature_ids(where)))
            except FeatureFormatError:
                lines.append(f"{folder}: the run's features are gone (moved or deleted)")
        missing = len(recorded - set().union(*(ids for _, ids in present.values())))
        for folder, (where, ids) in present.items():
            if self.holds_features_of(folder, where):
                continue
            added = len(ids - recorded)
            detail = ", ".join(part for part in (f"{added} clip(s) added" if added else "",
                                                 f"{missing} of the run's clips gone" if missing else "") if part)
            lines.append(f"{where}: changed since the run started ({detail or 'clips re-encoded or captions edited'})")
        return lines
