# One environment in .venv; every target that runs code sets it up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The user's files (override on the command line: make features TSV=... VIDEOS=...).
TSV ?= data/segmented_clips.tsv
VIDEOS ?= data/segmented_videos
FEATURES ?= data/features/train
VARIANT ?= large_44k_v2
MODE ?= 44k
CHECKPOINT ?= data/weights/mmaudio_$(VARIANT).pth
RUN ?= data/runs/$(VARIANT)
STEPS ?= 2000

.PHONY: setup test demo features train bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/mmaudio-lora demo

# Re-runs when the TSV changes; the command itself recomputes only what changed.
features: $(FEATURES)/manifest.json

$(FEATURES)/manifest.json: $(TSV) $(STAMP)
	$(BIN)/mmaudio-lora features --tsv $(TSV) --video-root $(VIDEOS) --out $(FEATURES) --mode $(MODE)

train: $(STAMP)
	$(BIN)/mmaudio-lora train --features $(FEATURES) --run $(RUN) --checkpoint $(CHECKPOINT) \
		--variant $(VARIANT) --steps $(STEPS) --resume

bench: $(STAMP)
	$(BIN)/python bench/precompute.py
