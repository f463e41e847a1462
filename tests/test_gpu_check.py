"""The prepared device check runs end to end at tiny sizes on the CPU, so it never rots."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_section(tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--device", "cpu", "--json",
                             str(tmp_path / "check.json")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAILED" not in result.stdout and result.stdout.startswith("section")
    results = json.loads((tmp_path / "check.json").read_text())
    for section in ("precision", "weights", "precompute", "training", "generation", "collectives", "user path"):
        assert section in results and "traceback" not in results[section], section
    assert results["collectives"]["all_reduce (gloo)"] == "ok"
    assert all(isinstance(results["user path"][f"{name} s"], float)
               for name in ("features", "train (20 steps)", "generate", "export"))
