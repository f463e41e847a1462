"""Using a fine-tune: generation (wav and mp4) and export of the merged checkpoint."""
