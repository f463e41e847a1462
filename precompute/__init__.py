"""Clips → feature memmaps in the ExtractedVGG format: decode, encode in batches, store; only what changed."""
