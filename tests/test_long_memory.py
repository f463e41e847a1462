"""Long audio in bounded memory: a 60 s video within 1.3x the peak of a 16 s one."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import TINY, audio_samples

REPO = Path(__file__).resolve().parents[1]

# One process imports what `generate` uses, then forks a child per command: each child starts from
# the same resident memory, as a fresh process would after its imports, and reports its own peak.
MEMORY_PROBE = """
import json, os, resource, sys
from typer.testing import CliRunner
from mmaudio_lora.cli import app
import generate.long, generate.run, open_clip, shared.pretrained, torch  # noqa: F401 (the imports, once)
peaks = []
for args in json.loads(sys.argv[1]):
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        result = CliRunner().invoke(app, args)
        os.write(write, json.dumps([result.exit_code, result.output[-2000:],
                                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]).encode())
        os._exit(0)
    os.close(write)
    report = b"".join(iter(lambda: os.read(read, 65536), b""))
    os.waitpid(child, 0)
    peaks.append(json.loads(report))
print(json.dumps(peaks))
"""


def test_memory_stays_within_a_window_s_whatever_the_length(tmp_path):
    """Peak RSS generating a 60 s video is at most 1.3x that of a 16 s video (tiny profile): frames
    are decoded per window and the track decoded in chunks."""
    from precompute.demo_clips import ClipSpec, write_clip

    commands = []
    for seconds in (16, 60):
        video = write_clip(tmp_path / f"v{seconds}.mp4", ClipSpec(float(seconds), width=320, height=240, seed=3))
        commands.append(["generate", "--no-adapter", *TINY, "--video", str(video), "--out",
                         str(tmp_path / f"out{seconds}"), "--steps", "1", "--no-mp4"])
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, json.dumps(commands)], capture_output=True, text=True,
                           timeout=900, cwd=REPO)
    assert probe.returncode == 0, probe.stderr[-2000:]
    (code16, output16, peak16), (code60, output60, peak60) = json.loads(probe.stdout.strip().splitlines()[-1])
    assert code16 == 0 and code60 == 0, output16 + output60
    for seconds in (16, 60):
        assert audio_samples(tmp_path / f"out{seconds}" / f"v{seconds}.wav") == seconds * 16000
    print(f"peak RSS: 16 s video {peak16 / 1024:.0f} MiB, 60 s video {peak60 / 1024:.0f} MiB")
    assert peak60 <= 1.3 * peak16, (peak16, peak60)
