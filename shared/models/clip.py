"""CLIP image and text features through open_clip (`ViT-H-14-378-quickgelu`, DFN5B weights)."""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

MODEL_NAME = "ViT-H-14-378-quickgelu"
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_model_config(sizes: dict | None = None) -> dict:
    """open_clip's configuration of the model; `sizes` ({embed_dim, vision_cfg, text_cfg}) shrink
    its widths, depths (and the tiny profile's patch count) while its input size and vocabulary stay."""
    import open_clip

    config = copy.deepcopy(open_clip.get_model_config(MODEL_NAME))
    if sizes is not None:
        config["embed_dim"] = sizes["embed_dim"]
        config["vision_cfg"].update(sizes["vision_cfg"])
        config["text_cfg"].update(sizes["text_cfg"])
    return config


class ClipEncoder(nn.Module):
    """Per-frame image features and per-token caption features, as MMAudio conditions on them."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.image_mean.device

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, 384, 384) in [0, 1] → (N, D), L2-normalized.

        The model is 378 px; its stride-14 patch convolution takes 27 x 27 patches from the
        384-px frames and ignores the last 6 rows and columns, as the reference does.
        """
        frames = (frames.to(self.device, torch.float32) - self.image_mean) / self.image_std
        return self.model.encode_image(frames, normalize=True)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(list(captions))

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Captions → (B, 77, D): every token after the final layer norm, L2-normalized.

        Not the pooled CLIP embedding: MMAudio attends over all 77 token features.
        """
        model = self.model
        tokens = self.tokenize(captions).to(self.device)
        x = model.token_embedding(tokens) + model.positional_embedding
        x = model.transformer(x, attn_mask=model.attn_mask)
        return F.normalize(model.ln_final(x), dim=-1)


@functools.cache
def _tokenizer():
    """open_clip's BPE tokenizer, built once a process (reading its vocabulary takes 0.2 s); it
    keeps no state between calls."""
    import open_clip

    return open_clip.get_tokenizer(MODEL_NAME)


def build_clip(sizes: dict | None = None) -> ClipEncoder:
    """The architecture (official, or at `sizes`) with zeroed weights, to be filled or loaded.

    Built on the meta device: a random initialisation of 1 B parameters costs seconds and is
    overwritten anyway. The one table that is not a weight, the text tower's causal mask, is
    made again as open_clip makes it."""
    from open_clip.model import CLIP

    config = clip_model_config(sizes)
    with torch.device("meta"):
        model = CLIP(**config)
    derived = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    if derived != {"attn_mask"}:  # another open_clip layout: build it the slow way
        model = CLIP(**config)
    else:
        model = model.to_empty(device="cpu")
        for tensor in model.state_dict().values():
            tensor.zero_()
        context = model.attn_mask.shape[0]
        model.attn_mask = torch.full((context, context), float("-inf")).triu_(1)
    return ClipEncoder(model.eval(), _tokenizer())
