"""Using a fine-tune: generation (wav and mp4), evaluation and its report, export of the merged checkpoint."""
