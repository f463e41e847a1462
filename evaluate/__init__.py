"""Judging a fine-tune: held-out scoring against the base model, the verdict's statistics,
cross-validation by source and the reports. It stands above generate/ (it generates); nothing
but the CLI imports it."""
