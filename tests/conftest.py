"""Shared test fixtures: the reference goldens that live beside the checkout."""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, no oversubscription
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the processes tests start, too
    import torch

    torch.set_num_threads(1)

from shared.runtime import Runtime  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("MMAUDIO_LORA_REFERENCE", REPO.parent / "shared" / "reference"))
EXAMPLE_DATA = REFERENCE.parent / "data"
FEATURE_CLIP_SECONDS = {f"c{index}": seconds for index, seconds in enumerate([2.0, 3.5, 5.0, 8.0, 4.0, 6.5])}


def _load_fill():
    path = REFERENCE / "fill.py"
    if not path.is_file():
        raise RuntimeError(f"reference goldens not found at {REFERENCE}; set MMAUDIO_LORA_REFERENCE")
    spec = importlib.util.spec_from_file_location("reference_fill", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    _load_fill()
    return REFERENCE


@pytest.fixture(scope="session")
def fill_state_dict():
    """The reference's deterministic filler: same keys and shapes give the same weights."""
    return _load_fill().fill_state_dict


@pytest.fixture(scope="session")
def trained_run(features, tmp_path_factory) -> Path:
    """One tiny run shared by the generate, evaluate, export and report tests: a validation split,
    audio samples and checkpoints every 3 steps, and a learning rate large enough that the adapter
    really changes the network."""
    from train.config import TrainConfig
    from train.loop import train

    folder = tmp_path_factory.mktemp("trained") / "run"
    train(TrainConfig(features=[str(features)], run=str(folder), profile="tiny", steps=6, batch_size=2, lr=1e-2,
                      warmup_steps=1, val_fraction=0.34, val_every=3, checkpoint_every=3, keep_last=2,
                      device="cpu", sample_every=3, sample_steps=2),
          show_progress=False)
    return folder


@pytest.fixture(scope="session")
def features(tmp_path_factory):
    """Tiny-profile features of six generated clips of 2-8 s (a real precompute run)."""
    from precompute.run import FeatureJob, run_features
    from precompute.demo_clips import ClipSpec, write_clip

    root = tmp_path_factory.mktemp("train-data")
    lines = ["video_path\tstart_time\tend_time\tcaption"]
    for index, duration in enumerate(FEATURE_CLIP_SECONDS.values()):
        write_clip(root / "videos" / f"c{index}.mp4", ClipSpec(duration, width=64, height=48, seed=index,
                                                                 tone_hz=300 + 100 * index))
        lines.append(f"c{index}.mp4\t0\t{duration}\tsound {index}")
    (root / "clips.tsv").write_text("\n".join(lines) + "\n")
    out = root / "features"
    run_features(FeatureJob(tsv=root / "clips.tsv", video_root=root / "videos", out=out,
                            runtime=Runtime(mode="16k", profile="tiny"), workers=0), show_progress=False)
    return out


# `make test` runs each file whole on one of the workers, in collection order (--no-loadscope-reorder:
# xdist would otherwise order files by their number of tests): the longest files go first, so that
# the workers end together on short ones.
LONGEST_FIRST = ("test_encoders.py", "test_crossval.py", "test_precompute.py", "test_generate.py",
                 "test_fast_paths.py", "test_train.py", "test_nothing_lost.py", "test_long_memory.py",
                 "test_network.py", "test_bad_input.py", "test_passt.py", "test_precision.py", "test_gpu_check.py",
                 "test_long.py", "test_report.py", "test_verdict.py", "test_runs.py", "test_long_evaluate.py",
                 "test_desync.py", "test_checkpoint.py", "test_buckets.py", "test_weights.py")
# measured: 105 s down to 4 s on 2 cores, two workers


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order stays


PROJECT_PACKAGES = ("shared", "precompute", "train", "generate", "evaluate", "mmaudio_lora")


class _ImportRefusal(importlib.abc.MetaPathFinder):
    """A finder that refuses the modules named (and their submodules), remembering each request."""

    def __init__(self, refused: tuple[str, ...]):
        self.refused, self.attempts = refused, []

    def find_spec(self, name, path=None, target=None):
        if name in self.refused or name.startswith(tuple(f"{module}." for module in self.refused)):
            self.attempts.append(name)
            raise ImportError(f"{name} is refused in this test")
        return None


@contextlib.contextmanager
def imports_refused(*modules: str) -> Iterator[_ImportRefusal]:
    """Inside: the project's modules import anew, as in a fresh interpreter but without paying for
    one, and the modules named (with their submodules) cannot be imported; `.attempts` lists every
    request for one. Afterwards every module is as it was."""
    saved = dict(sys.modules)
    for name in list(sys.modules):
        if name.split(".")[0] in PROJECT_PACKAGES or name in modules or name.startswith(
                tuple(f"{module}." for module in modules)):
            del sys.modules[name]
    refusal = _ImportRefusal(modules)
    sys.meta_path.insert(0, refusal)
    try:
        yield refusal
    finally:
        sys.meta_path.remove(refusal)
        for name in [name for name in sys.modules if name not in saved]:
            del sys.modules[name]
        sys.modules.update(saved)
