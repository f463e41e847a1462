"""Listening during training: audio for a few held-out clips every N steps.

Only the VAE decoder and the vocoder load, on the first sample, never an encoder.
Files: RUN/samples/step-NNNNNN/<clip id>.wav, and the same audio in TensorBoard.
"""
from __future__ import annotations

import logging
from pathlib import Path

from shared.features import FeatureSet
from shared.media import write_wav
from shared.models.network import MMAudio
from shared.runtime import Runtime
from shared.synthesis import AudioDecoder, SamplingSettings, sample_stored_clips

log = logging.getLogger(__name__)


class TrainingSamples:
    def __init__(self, run: Path, clips: FeatureSet, runtime: Runtime, settings: SamplingSettings):
        self.folder = Path(run) / "samples"
        self.clips = clips
        self.runtime = runtime
        self.decoder = AudioDecoder(runtime)
        self.settings = settings

    def write(self, network: MMAudio, step: int, tensorboard=None) -> list[Path]:
        """Generate every sample clip with the network as it is now (adapter active)."""
        rate = self.decoder.sampling_rate
        written = []
        for rows, seq, latents in sample_stored_clips(self.runtime, network, self.clips.tensors, self.settings):
            audio = self.decoder.waveform(latents)
            for row, n in enumerate(rows):
                samples = audio[row, :round(seq.window_sec * rate)]
                clip_id = self.clips.ids[n]
                written.append(write_wav(self.folder / f"step-{step:06d}" / f"{clip_id}.wav", samples, rate))
                if tensorboard is not None:
                    tensorboard.add_audio(f"samples/{clip_id}", samples[None], step, sample_rate=rate)
        log.info("step %d: %d sample(s) in %s", step, len(written), self.folder / f"step-{step:06d}")
        return written
