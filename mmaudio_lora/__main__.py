"""`python -m mmaudio_lora` (what `torchrun` starts for several processes)."""
from mmaudio_lora.cli import app

app(prog_name="mmaudio-lora")
