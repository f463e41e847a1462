"""The files of a feature folder, by name (no torch here: the no-op check of `features` reads them)."""

MEMMAP_DIR = "memmap"  # TensorDict memmap, as MMAudio's ExtractedVGG reads it
TSV_NAME = "clips.tsv"  # id, label: one row per memmap row
MANIFEST_NAME = "manifest.json"  # settings, weight identities, per-clip fingerprints; marks the folder as ours
SKIPPED_NAME = "skipped.txt"  # one line per clip left out, and why
