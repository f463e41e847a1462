"""DeSync: how far generated audio is out of step with its video, as the field reports it
(av-benchmark's metric, MMAudio's headline sync number).

Synchformer predicts the audio-video offset of a 4.48 s window (14 segments of 0.64 s every
0.32 s) as one of 21 classes from -2 s to +2 s. A clip's DeSync is the mean |offset| of its first
and last window, in seconds; lower is better, and clips shorter than 4.8 s (fewer than 14
segments) have none (NaN).

The video side is what `features` already stores: Synchformer's visual features (N, 192, 768)
are its (N, 24, 8, 768) segment features laid end to end. This module adds the rest of the
official Synchformer, under the official checkpoint's key names (`afeat_extractor.`, `vproj.`,
`aproj.`, `transformer.`), so its entries of `synchformer_state_dict.pth` load strictly:
- the audio branch: an Audio Spectrogram Transformer (a ViT over 16x16 patches of a 128-bin
  log-mel, stride 10) whose tokens are aggregated over frequency into 6 per segment;
- the sync head: both streams projected, normalised and joined with two auxiliary tokens in one
  sequence of 198 tokens, a 3-layer transformer, and the offset classifier on the first token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.mel import mel_filterbank
from shared.models.resample import TORCHAUDIO_DEFAULT_FILTER, resample
from shared.models.synchformer import ClsAggregation

SAMPLE_RATE = 16000
SEGMENT_SAMPLES = 10240  # 0.64 s, the span of one video segment (16 frames at 25 fps)
SEGMENT_STEP = 5120  # 0.32 s
N_FFT, WIN_LENGTH, HOP_LENGTH, N_MELS = 1024, 400, 160, 128
FBANK_FRAMES = 66  # what the AST's position embedding was shortened to
FBANK_MEAN, FBANK_STD = -4.2677393, 4.5689974  # AudioSet statistics of the log-mel
PATCH, PATCH_STRIDE = 16, 10
WINDOW_SEGMENTS = 14  # segments the sync head compares at once: 4.48 s
VIDEO_TOKENS, AUDIO_TOKENS = 8, 6  # per segment
OFFSET_RANGE_SEC, OFFSET_CLASSES = 2.0, 21
MIN_DESYNC_SEC = ((WINDOW_SEGMENTS - 1) * SEGMENT_STEP + SEGMENT_SAMPLES) / SAMPLE_RATE  # 4.8 s
PREFIXES = ("afeat_extractor.", "vproj.", "aproj.", "transformer.")


@dataclass(frozen=True)
class SyncScorerConfig:
    dim: int = 768
    ast_depth: int = 12
    ast_heads: int = 12
    head_depth: int = 3  # the sync transformer's layers
    head_heads: int = 8
    mlp_ratio: float = 4.0


def _patch_grid() -> tuple[int, int]:
    """(frequency, time) patches of one segment's fbank: (12, 6)."""
    return (N_MELS - PATCH) // PATCH_STRIDE + 1, (FBANK_FRAMES - PATCH) // PATCH_STRIDE + 1


# -- the audio branch: an Audio Spectrogram Transformer --------------------------------------------------

class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class ASTSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (layer(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for layer in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class ASTAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = ASTSelfAttention(dim, heads)
        self.output = _Dense(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class ASTLayer(nn.Module):
    """Pre-norm block: attention, then a GELU MLP, each around a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.attention = ASTAttention(dim, heads)
        self.intermediate = _Dense(dim, hidden)
        self.output = _Dense(hidden, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=1e-12)
        self.layernorm_after = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class ASTPatchEmbeddings(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.projection = nn.Conv2d(1, dim, kernel_size=PATCH, stride=PATCH_STRIDE)


class ASTEmbeddings(nn.Module):
    """Patches of the fbank, in (frequency, time) order, after a CLS and a distillation token."""

    def __init__(self, dim: int):
        super().__init__()
        frequency, time = _patch_grid()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, frequency * time + 2, dim))
        self.patch_embeddings = ASTPatchEmbeddings(dim)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:  # (N, 1, 128, 66) → (N, 2 + f t, D)
        patches = self.patch_embeddings.projection(fbank).flatten(2).transpose(1, 2)
        extra = torch.cat((self.cls_token, self.distillation_token), dim=1).expand(patches.shape[0], -1, -1)
        return torch.cat((extra, patches), dim=1) + self.position_embeddings


class ASTEncoder(nn.Module):
    def __init__(self, config: SyncScorerConfig):
        super().__init__()
        self.layer = nn.ModuleList([ASTLayer(config.dim, config.ast_heads, config.mlp_ratio)
                                    for _ in range(config.ast_depth)])


class AST(nn.Module):
    def __init__(self, config: SyncScorerConfig):
        super().__init__()
        self.embeddings = ASTEmbeddings(config.dim)
        self.encoder = ASTEncoder(config)
        self.layernorm = nn.LayerNorm(config.dim, eps=1e-12)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(fbank)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)


class AudioFeatureExtractor(nn.Module):
    """Segment fbanks → 6 features per segment: the AST's patch tokens aggregated over frequency."""

    def __init__(self, config: SyncScorerConfig):
        super().__init__()
        self.ast = AST(config)
        self.freq_attn_agg = ClsAggregation(config.dim, config.ast_heads, config.mlp_ratio)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:  # (N, 1, 128, 66) → (N, t, D)
        frequency, time = _patch_grid()
        tokens = self.ast(fbank)[:, 2:]  # the auxiliary tokens are not features
        per_time = tokens.unflatten(1, (frequency, time)).transpose(1, 2)  # (N, t, f, D)
        return self.freq_attn_agg(per_time.flatten(0, 1)).view(fbank.shape[0], time, -1)


# -- the sync head ---------------------------------------------------------------------------------------

class HeadAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.key, self.query, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (layer(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for layer in (self.query, self.key, self.value))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class HeadBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = HeadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PositionEmbedding(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.zeros(1, tokens, dim))


class SyncHead(nn.Module):
    """[OFF] video tokens [MOD] audio tokens → logits over the 21 offsets, from the OFF token."""

    def __init__(self, config: SyncScorerConfig):
        super().__init__()
        dim = config.dim
        self.OFF_tok = nn.Parameter(torch.zeros(1, 1, dim))
        self.MOD_tok = nn.Parameter(torch.zeros(1, 1, dim))
        self.vis_in_lnorm, self.aud_in_lnorm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.pos_emb_cfg = PositionEmbedding(2 + WINDOW_SEGMENTS * (VIDEO_TOKENS + AUDIO_TOKENS), dim)
        self.blocks = nn.ModuleList([HeadBlock(dim, config.head_heads, config.mlp_ratio)
                                     for _ in range(config.head_depth)])
        self.ln_f = nn.LayerNorm(dim)
        self.off_head = nn.Linear(dim, OFFSET_CLASSES)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        batch = video.shape[0]
        x = torch.cat((self.OFF_tok.expand(batch, -1, -1), self.vis_in_lnorm(video),
                       self.MOD_tok.expand(batch, -1, -1), self.aud_in_lnorm(audio)), dim=1)
        x = x + self.pos_emb_cfg.pos_emb
        for block in self.blocks:
            x = block(x)
        return self.off_head(self.ln_f(x)[:, 0])


# -- the scorer ------------------------------------------------------------------------------------------

def offset_grid() -> torch.Tensor:
    """The 21 offsets (seconds) the classes stand for, -2 to +2 by 0.2: start + k * step in float64,
    the last one exactly +2 (numpy's linspace, which the reference uses), then float32."""
    step = 2 * OFFSET_RANGE_SEC / (OFFSET_CLASSES - 1)
    grid = torch.arange(OFFSET_CLASSES, dtype=torch.float64) * step - OFFSET_RANGE_SEC
    grid[-1] = OFFSET_RANGE_SEC
    return grid.float()


def desync_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, windows, 21) logits → (B,) float64 seconds: the mean |offset| of each clip's windows
    (the first maximum wins a tie)."""
    offsets = offset_grid().to(logits.device)[logits.argmax(dim=-1)].abs()
    return offsets.double().mean(dim=1)


class SyncScorer(nn.Module):
    """Synchformer's audio branch and sync head: DeSync of audio against stored video features."""

    def __init__(self, config: SyncScorerConfig = SyncScorerConfig()):
        super().__init__()
        self.config = config
        self.afeat_extractor = AudioFeatureExtractor(config)
        self.vproj = nn.Linear(config.dim, config.dim)
        self.aproj = nn.Linear(config.dim, config.dim)
        self.transformer = SyncHead(config)
        self.register_buffer("mel_fb", mel_filterbank(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, N_MELS, SAMPLE_RATE,
                                                      scale="htk", area_normalized=False), persistent=False)
        self.register_buffer("stft_window", torch.hann_window(WIN_LENGTH), persistent=False)

    def fbank(self, wave_16k: torch.Tensor) -> torch.Tensor:
        """(B, T) mono 16 kHz audio → (B, S, 1, 128, 66) normalised log-mels of its segments
        (0.64 s every 0.32 s; samples after the last whole segment are not used)."""
        segments = wave_16k.float().unfold(-1, SEGMENT_SAMPLES, SEGMENT_STEP)  # (B, S, 10240)
        with torch.autocast(wave_16k.device.type, enabled=False):
            spectrum = torch.stft(segments.flatten(0, 1), N_FFT, hop_length=HOP_LENGTH, win_length=WIN_LENGTH,
                                  window=self.stft_window, center=True, pad_mode="reflect", return_complex=True)
            power = spectrum.abs().pow(2)  # (N, 513, 65)
            log_mel = torch.log(torch.matmul(power.transpose(-1, -2), self.mel_fb).transpose(-1, -2) + 1e-6)
        frames = log_mel.shape[-1]
        log_mel = F.pad(log_mel, (0, FBANK_FRAMES - frames)) if frames < FBANK_FRAMES else log_mel[..., :FBANK_FRAMES]
        normalised = (log_mel - FBANK_MEAN) / (2 * FBANK_STD)
        return normalised.view(*segments.shape[:2], 1, N_MELS, FBANK_FRAMES)

    def audio_features(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, S, 1, 128, 66) → (B, S, 6, D)."""
        features = self.afeat_extractor(fbank.flatten(0, 1))
        return features.unflatten(0, fbank.shape[:2])

    def logits(self, video_features: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        """One window: video (B, 14, 8, D) and audio (B, 14, 6, D) features → (B, 21) offset logits."""
        video = self.vproj(video_features).flatten(1, 2)
        audio = self.aproj(audio_features).flatten(1, 2)
        return self.transformer(video, audio)

    @torch.no_grad()
    def desync(self, video_features: torch.Tensor, wave_16k: torch.Tensor) -> torch.Tensor:
        """Per clip (B,), seconds, float64: the mean |offset| of the first and last window of 14
        segments; NaN for clips shorter than 4.8 s. `video_features`: Synchformer's visual features
        of the same clips, (B, S, 8, D) or as stored, (B, 8 S, D)."""
        if wave_16k.shape[-1] < MIN_DESYNC_SEC * SAMPLE_RATE:
            return torch.full((wave_16k.shape[0],), math.nan, dtype=torch.float64)
        if video_features.dim() == 3:
            video_features = video_features.unflatten(1, (-1, VIDEO_TOKENS))
        audio = self.audio_features(self.fbank(wave_16k))
        segments = min(audio.shape[1], video_features.shape[1])
        if segments < WINDOW_SEGMENTS:
            return torch.full((wave_16k.shape[0],), math.nan, dtype=torch.float64)
        video = video_features.to(audio.dtype)
        windows = [slice(0, WINDOW_SEGMENTS), slice(segments - WINDOW_SEGMENTS, segments)]
        logits = torch.stack([self.logits(video[:, w], audio[:, w]) for w in windows], dim=1)
        return desync_of_logits(logits).cpu()


def build_sync_scorer(config: SyncScorerConfig = SyncScorerConfig()) -> SyncScorer:
    """The scorer at the official size (or `config`'s), weights not loaded."""
    return SyncScorer(config)


def to_16k(wave: torch.Tensor, rate: int) -> torch.Tensor:
    """(B, T) audio at `rate` → (B, T') at 16 kHz, as av-benchmark reads a generated file for DeSync:
    torchaudio's `Resample(rate, 16000)` at its defaults (Hann window, 6 zero crossings, rolloff
    0.99). Not MMAudio's training resampler (Kaiser, 64, 0.9476): the two differ by up to 0.2 in
    the 7-8 kHz band that DeSync's top mel bins see."""
    return resample(wave.float(), rate, SAMPLE_RATE, TORCHAUDIO_DEFAULT_FILTER)


def scorer_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a full Synchformer checkpoint that the scorer uses (all but the visual branch)."""
    return {key: value for key, value in state_dict.items() if key.startswith(PREFIXES)}
