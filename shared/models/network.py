"""The MMAudio flow-matching transformer, with the official state-dict layout.

`build_network("small_16k")` builds an official variant; `build_network(None, **hp)` any other
size (the tiny test profile). Module names reproduce the official checkpoint keys, so official
files load with strict=True.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.layers import (
    MLP,
    ChannelLastConv1d,
    ConvMLP,
    FinalBlock,
    JointBlock,
    MMDitSingleBlock,
    TimestepEmbedder,
    rotary_table,
)
from shared.models.sequence import LATENT_DIMS, SYNC_TOKENS_PER_WINDOW, TEXT_SEQ_LEN, VARIANT_MODES, SequenceConfig


@dataclass(frozen=True)
class NetworkConfig:
    """Constructor hyper-parameters, by the reference's names."""

    latent_dim: int
    clip_dim: int
    sync_dim: int
    text_dim: int
    hidden_dim: int
    depth: int
    fused_depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    latent_seq_len: int = 250
    clip_seq_len: int = 64
    sync_seq_len: int = 192
    text_seq_len: int = TEXT_SEQ_LEN
    v2: bool = False

    @property
    def mode(self) -> str:
        """The audio mode a latent width belongs to (the VAE decides it)."""
        return "16k" if self.latent_dim == LATENT_DIMS["16k"] else "44k"


def _official(variant: str, latent_dim: int, hidden_dim: int, num_heads: int, depth: int, fused_depth: int,
              v2: bool = False) -> NetworkConfig:
    seq = SequenceConfig(VARIANT_MODES[variant])
    return NetworkConfig(latent_dim=latent_dim, clip_dim=1024, sync_dim=768, text_dim=1024,
                         hidden_dim=hidden_dim, depth=depth, fused_depth=fused_depth,
                         num_heads=num_heads, latent_seq_len=seq.latent_seq_len,
                         clip_seq_len=seq.clip_seq_len, sync_seq_len=seq.sync_seq_len, v2=v2)


VARIANTS: dict[str, NetworkConfig] = {
    "small_16k": _official("small_16k", 20, 448, 7, 12, 8),
    "small_44k": _official("small_44k", 40, 448, 7, 12, 8),
    "medium_44k": _official("medium_44k", 40, 896, 14, 12, 8),
    "large_44k": _official("large_44k", 40, 896, 14, 21, 14),
    "large_44k_v2": _official("large_44k_v2", 40, 896, 14, 21, 14, v2=True),
}


@dataclass
class Conditions:
    """Projected conditioning streams, computed once per clip and reused at every ODE step."""

    clip_f: torch.Tensor  # (B, N_c, D)
    sync_f: torch.Tensor  # (B, N_a, D), resampled to the latent rate
    text_f: torch.Tensor  # (B, 77, D)
    clip_f_c: torch.Tensor  # (B, D)
    text_f_c: torch.Tensor  # (B, D)

    def expand(self, batch_size: int) -> Conditions:
        return Conditions(**{field.name: getattr(self, field.name).expand(batch_size, *getattr(self, field.name).shape[1:])
                             for field in fields(self)})


class MMAudio(nn.Module):
    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        D = config.hidden_dim
        self.latent_dim = config.latent_dim
        self.hidden_dim = D
        self.num_heads = config.num_heads
        self.latent_seq_len = config.latent_seq_len
        self.clip_seq_len = config.clip_seq_len
        self.sync_seq_len = config.sync_seq_len

        # v2 uses SiLU everywhere and adds one after the clip and text Linears.
        act = nn.SiLU if config.v2 else nn.SELU
        self.audio_input_proj = nn.Sequential(
            ChannelLastConv1d(config.latent_dim, D, kernel_size=7, padding=3),
            act(),
            ConvMLP(D, D * 4, kernel_size=7, padding=3),
        )
        clip_layers = [nn.Linear(config.clip_dim, D)] + ([nn.SiLU()] if config.v2 else [])
        self.clip_input_proj = nn.Sequential(*clip_layers, ConvMLP(D, D * 4, kernel_size=3, padding=1))
        self.sync_input_proj = nn.Sequential(
            ChannelLastConv1d(config.sync_dim, D, kernel_size=7, padding=3),
            act(),
            ConvMLP(D, D * 4, kernel_size=3, padding=1),
        )
        text_layers = [nn.Linear(config.text_dim, D)] + ([nn.SiLU()] if config.v2 else [])
        self.text_input_proj = nn.Sequential(*text_layers, MLP(D, D * 4))

        self.clip_cond_proj = nn.Linear(D, D)
        self.text_cond_proj = nn.Linear(D, D)
        self.global_cond_mlp = MLP(D, D * 4)
        self.final_layer = FinalBlock(D, config.latent_dim)
        if config.v2:
            self.t_embed = TimestepEmbedder(D, frequency_embedding_size=D, max_period=1)
        else:
            self.t_embed = TimestepEmbedder(D, frequency_embedding_size=256, max_period=10000)

        joint_depth = config.depth - config.fused_depth
        self.gradient_checkpointing = False  # see _run_block; the trainer turns it on
        self.joint_blocks = nn.ModuleList([
            JointBlock(D, config.num_heads, config.mlp_ratio, pre_only=(i == joint_depth - 1))
            for i in range(joint_depth)
        ])
        self.fused_blocks = nn.ModuleList([
            MMDitSingleBlock(D, config.num_heads, config.mlp_ratio, kernel_size=3, padding=1)
            for _ in range(config.fused_depth)
        ])

        self.sync_pos_emb = nn.Parameter(torch.zeros(1, 1, SYNC_TOKENS_PER_WINDOW, config.sync_dim))
        self.latent_mean = nn.Parameter(torch.zeros(1, 1, config.latent_dim), requires_grad=False)
        self.latent_std = nn.Parameter(torch.ones(1, 1, config.latent_dim), requires_grad=False)
        self.empty_string_feat = nn.Parameter(torch.zeros(config.text_seq_len, config.text_dim),
                                              requires_grad=False)
        self.empty_clip_feat = nn.Parameter(torch.zeros(1, config.clip_dim))
        self.empty_sync_feat = nn.Parameter(torch.zeros(1, config.sync_dim))

        self.register_buffer("latent_rot", torch.empty(0), persistent=False)
        self.register_buffer("clip_rot", torch.empty(0), persistent=False)
        self.update_seq_lengths(config.latent_seq_len, config.clip_seq_len, config.sync_seq_len)

    # -- lengths -------------------------------------------------------------------------------
    def update_seq_lengths(self, latent_seq_len: int, clip_seq_len: int, sync_seq_len: int) -> None:
        """Switch to another duration: the weights are length-independent, the RoPE tables are not."""
        self.latent_seq_len = latent_seq_len
        self.clip_seq_len = clip_seq_len
        self.sync_seq_len = sync_seq_len
        self.config = replace(self.config, latent_seq_len=latent_seq_len,
                              clip_seq_len=clip_seq_len, sync_seq_len=sync_seq_len)
        self.rebuild_buffers()

    def rebuild_buffers(self) -> None:
        """Recompute the non-persistent tables (needed after building on the meta device)."""
        device = self.sync_pos_emb.device
        head_dim = self.hidden_dim // self.num_heads
        self.latent_rot = rotary_table(self.latent_seq_len, head_dim, device=device)
        self.clip_rot = rotary_table(self.clip_seq_len, head_dim,
                                     freq_scaling=self.latent_seq_len / self.clip_seq_len, device=device)
        self.t_embed.freqs = self.t_embed.frequencies(device=device)

    # -- conditioning --------------------------------------------------------------------------
    def preprocess_conditions(self, clip_f: torch.Tensor, sync_f: torch.Tensor,
                              text_f: torch.Tensor) -> Conditions:
        batch = clip_f.shape[0]
        if (clip_f.shape[1], sync_f.shape[1], text_f.shape[1]) != (
                self.clip_seq_len, self.sync_seq_len, self.config.text_seq_len):
            raise ValueError(
                f"condition lengths (clip {clip_f.shape[1]}, sync {sync_f.shape[1]}, text "
                f"{text_f.shape[1]}) do not match the network's ({self.clip_seq_len}, "
                f"{self.sync_seq_len}, {self.config.text_seq_len}); call update_seq_lengths first")
        windows = self.sync_seq_len // SYNC_TOKENS_PER_WINDOW
        sync_f = (sync_f.view(batch, windows, SYNC_TOKENS_PER_WINDOW, -1) + self.sync_pos_emb).flatten(1, 2)

        clip_f = self.clip_input_proj(clip_f)
        sync_f = self.sync_input_proj(sync_f)
        text_f = self.text_input_proj(text_f)

        # Bring the sync stream to the latent frame rate: it conditions the latents token by token.
        sync_f = F.interpolate(sync_f.transpose(1, 2), size=self.latent_seq_len,
                               mode="nearest-exact").transpose(1, 2)
        return Conditions(
            clip_f=clip_f,
            sync_f=sync_f,
            text_f=text_f,
            clip_f_c=self.clip_cond_proj(clip_f.mean(dim=1)),
            text_f_c=self.text_cond_proj(text_f.mean(dim=1)),
        )

    def get_empty_conditions(self, batch_size: int,
                             negative_text_features: torch.Tensor | None = None) -> Conditions:
        """Null conditions for classifier-free guidance (a negative prompt replaces the empty text)."""
        if negative_text_features is None:
            text = self.empty_string_feat.unsqueeze(0)
        else:
            text = negative_text_features.reshape(-1, *self.empty_string_feat.shape)[:1]
        return self.preprocess_conditions(self.get_empty_clip_sequence(1), self.get_empty_sync_sequence(1),
                                          text).expand(batch_size)

    def get_empty_clip_sequence(self, batch_size: int) -> torch.Tensor:
        """The 'no video' CLIP features (B, clip_seq_len, clip_dim): text-to-audio uses them."""
        return self.empty_clip_feat.expand(batch_size, self.clip_seq_len, -1)

    def get_empty_sync_sequence(self, batch_size: int) -> torch.Tensor:
        return self.empty_sync_feat.expand(batch_size, self.sync_seq_len, -1)

    # -- flow ----------------------------------------------------------------------------------
    def predict_flow(self, latent: torch.Tensor, t: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        if latent.shape[1] != self.latent_seq_len:
            raise ValueError(f"latent length {latent.shape[1]} does not match the network's "
                             f"{self.latent_seq_len}; call update_seq_lengths first")
        x = self.audio_input_proj(latent)
        global_c = self.global_cond_mlp(conditions.clip_f_c + conditions.text_f_c)
        global_c = self.t_embed(t).unsqueeze(1) + global_c.unsqueeze(1)  # (B, 1, D)
        extended_c = global_c + conditions.sync_f  # (B, N_a, D): per-token for the latents

        clip_f, text_f = conditions.clip_f, conditions.text_f
        for block in self.joint_blocks:
            x, clip_f, text_f = self._run_block(block, x, clip_f, text_f, global_c, extended_c,
                                                self.latent_rot, self.clip_rot)
        for block in self.fused_blocks:
            x = self._run_block(block, x, extended_c, self.latent_rot)
        # Conditioned on global_c, not extended_c: the official checkpoints were trained this way.
        return self.final_layer(x, global_c)

    def _run_block(self, block: nn.Module, *inputs):
        """A transformer block; with gradient checkpointing (training), its activations are not
        kept but recomputed in the backward pass: memory for one block instead of all of them."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)

    def forward(self, latent: torch.Tensor, clip_f: torch.Tensor, sync_f: torch.Tensor,
                text_f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.predict_flow(latent, t, self.preprocess_conditions(clip_f, sync_f, text_f))

    # -- latent statistics ---------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.latent_mean) / self.latent_std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.latent_std + self.latent_mean


def build_network(variant: str | None = None, **hyperparameters) -> MMAudio:
    """An official variant by name, or any size from the constructor's hyper-parameters.

    With a variant, hyper-parameters override its values (e.g. other sequence lengths).
    """
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown network variant {variant!r}; expected one of {sorted(VARIANTS)}")
        config = replace(VARIANTS[variant], **hyperparameters)
    else:
        config = NetworkConfig(**hyperparameters)
    return MMAudio(config)
