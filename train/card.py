"""The model card every adapter folder carries (README.md, Hugging Face / PEFT convention)."""
from __future__ import annotations

from train.config import TrainConfig

CARD_TAGS = ("mmaudio", "video-to-audio", "text-to-audio", "flow-matching", "lora", "peft", "mmaudio-lora")


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def model_card(config: TrainConfig, train_clips: int, train_seconds: float, val_clips: int, step: int,
               best_val_loss: float | None, best_step: int | None, skipped_steps: int = 0) -> str:
    """README.md for an adapter saved at `step` of the run `config` describes (`skipped_steps` of
    them updated nothing: their loss was not finite)."""
    skipped = f", {skipped_steps} more skipped: loss not finite" if skipped_steps else ""
    tags = "\n".join(f"- {tag}" for tag in CARD_TAGS)
    best = f"{best_val_loss:.4f} at step {best_step}" if best_val_loss is not None else "no validation split"
    options = (f"rank {config.rank}, alpha {config.alpha:g}, dropout {config.lora_dropout:g}, "
               f"rsLoRA {'yes' if config.use_rslora else 'no'}, DoRA {'yes' if config.use_dora else 'no'}")
    return f"""---
base_model: hkchengrex/MMAudio
library_name: peft
license: cc-by-nc-4.0
tags:
{tags}
---
# LoRA adapter for MMAudio {config.variant}

Fine-tuned with mmaudio-lora: LoRA on the frozen network, trained from precomputed video, text and audio features.

| | |
|---|---|
| base network | {config.variant} ({config.profile} profile) |
| training clips | {train_clips} ({_duration(train_seconds)} in all); {val_clips} held out for validation |
| LoRA | {options} |
| target modules | `{config.target_modules}` |
| steps | {step - skipped_steps} trained{skipped} (step {step} of {config.steps}; batch {config.batch_size}, learning rate {config.lr:g}, {config.schedule}) |
| length buckets | {f"{config.length_bucket_sec:g} s" if config.length_bucket_sec else "off (fixed 8 s window)"} |
| best validation loss | {best} |

## Use

```bash
mmaudio-lora generate --adapter THIS_FOLDER --video clip.mp4 --out generated/
```

## Licence

The base weights are MMAudio's checkpoints, released under CC-BY-NC 4.0 (non-commercial) and
trained on data sets with licences of their own; this adapter only works with them. Check these
terms before any commercial use of audio made with it.
"""
