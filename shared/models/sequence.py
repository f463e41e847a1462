"""Sequence lengths of the model's window, derived from mode and duration.

Every other module asks this one for lengths; none retypes 250, 345, 64 or 192. The user's
choices of variant, mode and window are checked where they enter (shared/runtime.py); here a
value outside these tables is a programming error (ValueError).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Audio properties of each mode: sample rate and mel hop (the spectrogram frame rate).
AUDIO_MODES: dict[str, tuple[int, int]] = {"16k": (16000, 256), "44k": (44100, 512)}

# The latent width of each mode's VAE: the latents of a feature folder tell its mode.
LATENT_DIMS = {"16k": 20, "44k": 40}
# The audio mode of each official network variant (its VAE's).
VARIANT_MODES = {"small_16k": "16k", "small_44k": "44k", "medium_44k": "44k", "large_44k": "44k",
                 "large_44k_v2": "44k"}
DEFAULT_VARIANT = "large_44k_v2"

CLIP_FPS = 8
SYNC_FPS = 25
SYNC_WINDOW_FRAMES = 16
SYNC_WINDOW_STRIDE = 8
SYNC_TOKENS_PER_WINDOW = 8
TEXT_SEQ_LEN = 77
DEFAULT_WINDOW_SEC = 8.0  # the window the official networks were trained on, and the longest we train on
# The shortest clip we keep: one Synchformer window (16 frames at 25 fps). Shorter segments (one cut
# near a file's end) have no sync features at all, so `features` leaves them out.
MIN_CLIP_SEC = SYNC_WINDOW_FRAMES / SYNC_FPS


@dataclass(frozen=True)
class SequenceConfig:
    """The lengths of every stream for one audio mode and window length."""

    mode: str = "16k"
    window_sec: float = DEFAULT_WINDOW_SEC  # the model's window (a clip's content may be shorter)

    def __post_init__(self) -> None:
        if self.mode not in AUDIO_MODES:
            raise ValueError(f"unknown audio mode {self.mode!r}; expected one of {sorted(AUDIO_MODES)}")
        if self.sync_windows < 1:
            raise ValueError(
                f"duration {self.window_sec} s is too short: Synchformer needs at least "
                f"{SYNC_WINDOW_FRAMES / SYNC_FPS:.2f} s of video"
            )

    @property
    def sampling_rate(self) -> int:
        return AUDIO_MODES[self.mode][0]

    @property
    def hop_length(self) -> int:
        return AUDIO_MODES[self.mode][1]

    def latent_frames(self, seconds: float) -> int:
        """Latent frames that `seconds` of audio need: the one latent-length formula (the VAE halves
        the mel frame rate)."""
        return math.ceil(seconds * self.sampling_rate / self.hop_length / 2)

    @property
    def latent_seq_len(self) -> int:
        return self.latent_frames(self.window_sec)

    @property
    def clip_seq_len(self) -> int:
        return int(self.window_sec * CLIP_FPS)

    @property
    def sync_frames(self) -> int:
        return int(self.window_sec * SYNC_FPS)

    @property
    def sync_windows(self) -> int:
        return (self.sync_frames - SYNC_WINDOW_FRAMES) // SYNC_WINDOW_STRIDE + 1

    @property
    def sync_seq_len(self) -> int:
        return self.sync_windows * SYNC_TOKENS_PER_WINDOW

    @property
    def text_seq_len(self) -> int:
        return TEXT_SEQ_LEN

    @property
    def mel_frames(self) -> int:
        return self.latent_seq_len * 2

    @property
    def num_audio_samples(self) -> int:
        """Samples the window covers (rounded up to whole latent frames)."""
        return self.latent_seq_len * self.hop_length * 2
