"""The LoRA trainer: reads only the feature memmaps (no encoder is ever imported here)."""
