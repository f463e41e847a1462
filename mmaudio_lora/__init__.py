"""mmaudio-lora: fine-tune MMAudio with LoRA on your own videos."""
__version__ = "0.1.0"
