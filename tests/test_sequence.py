import pytest

from shared.models.sequence import SequenceConfig


@pytest.mark.parametrize("mode, latents, samples", [("16k", 250, 128000), ("44k", 345, 353280)])
def test_eight_second_window(mode, latents, samples):
    seq = SequenceConfig(mode, 8.0)
    assert (seq.latent_seq_len, seq.clip_seq_len, seq.sync_seq_len) == (latents, 64, 192)
    assert seq.num_audio_samples == samples
    assert seq.mel_frames == 2 * latents


def test_five_seconds_at_16k():
    seq = SequenceConfig("16k", 5.0)
    assert (seq.latent_seq_len, seq.clip_seq_len, seq.sync_windows, seq.sync_seq_len) == (157, 40, 14, 112)


def test_valid_frames_of_a_padded_clip():
    import torch

    from shared.models.flow import valid_frames

    frames = valid_frames(torch.tensor([8.0, 5.0, 11.0, 0.0]), SequenceConfig("16k", 8.0))
    assert frames.tolist() == [250, 157, 250, 1]


def test_bad_mode_and_duration():
    with pytest.raises(ValueError, match="mode"):
        SequenceConfig("22k")
    with pytest.raises(ValueError, match="too short"):
        SequenceConfig("16k", 0.5)
