"""The prepared device check runs end to end at tiny sizes on the CPU, so it never rots."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_section(tmp_path, capsys, monkeypatch):
    """In this process (its startup would cost more than the check)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts the repository first on the path
    spec.loader.exec_module(gpu_check)
    status = gpu_check.main(["--smoke", "--device", "cpu", "--json", str(tmp_path / "check.json")])
    printed = capsys.readouterr().out
    assert status == 0, printed[-3000:]
    assert "FAILED" not in printed and printed.startswith("examples: 0")
    for row in ("clips measured", "LoRA: FLOPs per step", "peak bf16 TFLOP/s used",
                "trainer through DDP, one rank"):
        assert row in printed, row
    results = json.loads((tmp_path / "check.json").read_text())
    for section in ("precision", "weights", "precompute", "training", "generation", "collectives", "user path"):
        assert section in results and "traceback" not in results[section], section
    assert results["machine"]["examples"] == 0
    assert results["collectives"]["all_reduce (gloo)"] == "ok"
    assert results["training"]["flops_per_step"] > 0 and results["training"]["peak_tflops"] is None  # CPU
    assert isinstance(results["collectives"]["trainer through DDP, one rank (s)"], float)
    assert all(isinstance(results["user path"][f"{name} s"], float)
               for name in ("features", "train (20 steps)", "generate", "export"))
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0 and gpu_check.peak_tflops("NVIDIA H200 NVL") == 835.0
    assert gpu_check.peak_tflops("NVIDIA GeForce GTX 1080") is None

    # a run cut short (here: interrupted in its second section) keeps what the first measured
    def interrupted(check):
        raise KeyboardInterrupt

    monkeypatch.setitem(gpu_check.SECTIONS, "generation", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--smoke", "--device", "cpu", "--sections", "weights,generation", "--json",
                        str(tmp_path / "cut.json")])
    assert json.loads((tmp_path / "cut.json").read_text())["weights"]["files"].startswith("none")
