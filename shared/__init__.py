"""What both stages use; imports no stage.

models/ holds the networks of the reference (MMAudio's transformer, its encoders and decoders, the
metric networks) and imports nothing else of ours; the modules here are the formats the stages
exchange (clip lists, feature folders, run records, media, checkpoints) and the plumbing of a
command (runtime, profiles and weights, devices, outputs, errors).
"""
__version__ = "0.1.0"  # the tool's version: feature manifests record it, `mmaudio-lora --version` prints it
