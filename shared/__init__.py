"""What both stages use; imports no stage."""
__version__ = "0.1.0"  # the tool's version: feature manifests record it, `mmaudio-lora --version` prints it
