"""Using a fine-tune: export (and, to come, generation and evaluation)."""
