"""mmaudio-lora: fine-tune MMAudio with LoRA on your own videos."""
from shared import __version__  # noqa: F401  (one source: shared/__init__.py)
