"""Shared test fixtures: the reference goldens that live beside the checkout."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("MMAUDIO_LORA_REFERENCE", REPO.parent / "shared" / "reference"))
EXAMPLE_DATA = REFERENCE.parent / "data"


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

