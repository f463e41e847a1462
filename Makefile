# One environment in .venv, exactly as uv.lock pins it; every target that runs code sets it up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# uv itself lives in its own small venv, so nothing is installed outside the project.
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv

# The user's files (override on the command line: make features TSV=... VIDEOS=...).
TSV ?= data/segmented_clips.tsv
VIDEOS ?= data/segmented_videos
FEATURES ?= data/features/train
VARIANT ?= large_44k_v2
CHECKPOINT ?= data/weights/mmaudio_$(VARIANT).pth
RUN ?= data/runs/$(VARIANT)
STEPS ?= 2000
VIDEO ?= data/new_videos
OUT ?= data/generated/$(VARIANT)

.PHONY: setup lock test demo features train crossval generate evaluate export bench gpu-check

setup: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

# --locked: install exactly the lock, and stop if pyproject.toml no longer agrees with it.
# --compile-bytecode: every package compiled once here, not by each process that imports it (where
# PYTHONDONTWRITEBYTECODE is set, as on our development machines, nothing is ever cached: torch and
# open_clip took 17 s to import in every process, 4.5 s compiled).
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra test --compile-bytecode --python $(PYTHON)
	touch $(STAMP)

# Re-resolve every package to the newest release that pyproject.toml allows.
lock: | $(UV)
	$(UV) lock --upgrade

# The report test needs chromium: installed here when missing and we are root (as CI is), else named.
# One worker per core (pytest-xdist), each test file whole on one worker (its module fixtures built once).
test: $(STAMP)
	@tests/tools/require-browser
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

demo: $(STAMP)
	$(BIN)/mmaudio-lora demo

# Always asks the command: it decides what changed (list, videos, settings, weights) and answers
# "up to date" in a fraction of a second, without loading torch, when nothing did.
features: $(STAMP)
	$(BIN)/mmaudio-lora features --tsv $(TSV) --video-root $(VIDEOS) --out $(FEATURES) --variant $(VARIANT)

train: $(STAMP)
	$(BIN)/mmaudio-lora train --features $(FEATURES) --run $(RUN) --checkpoint $(CHECKPOINT) \
		--variant $(VARIANT) --steps $(STEPS) --resume

# K adapters, each judged on the source videos it never saw; the verdict is over all sources.
# Written beside the run (RUN-crossval), never inside it, whether RUN ends in / or not.
FOLDS ?= 4
REPEATS ?= 1
crossval: $(STAMP)
	$(BIN)/mmaudio-lora crossval --features $(FEATURES) --run $(patsubst %/,%,$(RUN))-crossval \
		--checkpoint $(CHECKPOINT) --variant $(VARIANT) --steps $(STEPS) --folds $(FOLDS) --repeats $(REPEATS)

# Audio for a video file or a folder of videos, with the run's final adapter.
generate: $(STAMP)
	$(BIN)/mmaudio-lora generate --run $(RUN) --video $(VIDEO) --out $(OUT)

# Base model against the fine-tune on the run's validation clips.
evaluate: $(STAMP)
	$(BIN)/mmaudio-lora evaluate --run $(RUN)

export: $(STAMP)
	$(BIN)/mmaudio-lora export --run $(RUN) --out $(RUN)/merged_$(VARIANT).pth

bench: $(STAMP)
	$(BIN)/python bench/precompute.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/generate.py

# The prepared device check (one GPU, about 5 minutes): prints a table, writes gpu_check.json.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py
