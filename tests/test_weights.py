"""Finding weight files (doctor) and fetching them (download) against a server on 127.0.0.1."""
import dataclasses
import hashlib
import http.server
import json
import threading

import pytest
import torch
from typer.testing import CliRunner

import shared.weights as weights
from mmaudio_lora.cli import app
from shared.weights import DownloadError, VOCODER_WEIGHTS, download_file, needed_files, resolve

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Server(http.server.ThreadingHTTPServer):
    """Serves `files`; paths listed in `cut_once` send only half their bytes the first time."""

    def __init__(self, files, cut_once=()):
        self.files, self.cut_once, self.requests = files, set(cut_once), []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        name = self.path.lstrip("/")
        server.requests.append((name, self.headers.get("Range")))
        if name not in server.files:
            self.send_error(404)
            return
        body = server.files[name]
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if name in server.cut_once:
            server.cut_once.discard(name)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    servers = []

    def start(files, cut_once=()):
        instance = _Server(files, cut_once)
        threading.Thread(target=instance.serve_forever, daemon=True).start()
        servers.append(instance)
        return instance, f"http://127.0.0.1:{instance.server_address[1]}"

    yield start
    for instance in servers:
        instance.shutdown()
        instance.server_close()


def test_complete_download_is_verified_and_renamed(server, tmp_path):
    _, url = server({"v1-16.pth": PAYLOAD})
    target = tmp_path / "v1-16.pth"
    download_file(f"{url}/v1-16.pth", target, md5=hashlib.md5(PAYLOAD).hexdigest())
    assert target.read_bytes() == PAYLOAD
    assert not list(tmp_path.glob("*.part"))


def test_truncated_transfer_resumes(server, tmp_path):
    instance, url = server({"best_netG.pt": PAYLOAD}, cut_once={"best_netG.pt"})
    target = tmp_path / "best_netG.pt"
    download_file(f"{url}/best_netG.pt", target, md5=hashlib.md5(PAYLOAD).hexdigest())
    assert target.read_bytes() == PAYLOAD
    ranges = [r for _, r in instance.requests]
    assert ranges[0] is None and ranges[1] == f"bytes={len(PAYLOAD) // 2}-"  # the second asked for the rest


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    instance, url = server({"v1-44.pth": PAYLOAD})
    (tmp_path / "v1-44.pth.part").write_bytes(PAYLOAD[:1000])
    download_file(f"{url}/v1-44.pth", tmp_path / "v1-44.pth", md5=hashlib.md5(PAYLOAD).hexdigest())
    assert (tmp_path / "v1-44.pth").read_bytes() == PAYLOAD
    assert instance.requests == [("v1-44.pth", "bytes=1000-")]


def test_corrupted_file_is_rejected(server, tmp_path):
    corrupt = bytearray(PAYLOAD)
    corrupt[12345] ^= 0xFF
    _, url = server({"v1-16.pth": bytes(corrupt)})
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_file(f"{url}/v1-16.pth", tmp_path / "v1-16.pth", md5=hashlib.md5(PAYLOAD).hexdigest())
    assert not (tmp_path / "v1-16.pth").exists() and not list(tmp_path.glob("*.part"))


def test_doctor_and_download_commands(server, tmp_path, monkeypatch):
    """doctor fails while files are missing, download fetches them from a mirror, then doctor passes."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    files = {wf.filename: wf.filename.encode() * 10 for wf, _ in needed_files("small_16k")}
    # The official md5 sums cannot match these stand-in files: the same list without checksums.
    stand_ins = [(dataclasses.replace(wf, md5=None), cmds) for wf, cmds in needed_files("small_16k")]
    monkeypatch.setattr(weights, "needed_files", lambda variant: stand_ins)
    _, url = server(files)
    runner = CliRunner()
    weights_dir = tmp_path / "weights"

    result = runner.invoke(app, ["doctor", "--variant", "small_16k", "--weights-dir", str(weights_dir)])
    assert result.exit_code == 1
    assert "MISSING" in result.output and "mmaudio_small_16k.pth" in result.output and "CC-BY-NC" in result.output

    result = runner.invoke(app, ["download", "--variant", "small_16k", "--weights-dir", str(weights_dir),
                                 "--mirror", url])
    assert result.exit_code == 0, result.output
    assert (weights_dir / "mmaudio_small_16k.pth").read_bytes() == files["mmaudio_small_16k.pth"]
    assert (weights_dir / "DFN5B-CLIP-ViT-H-14-384" / "open_clip_pytorch_model.bin").is_file()

    result = runner.invoke(app, ["doctor", "--variant", "small_16k", "--weights-dir", str(weights_dir)])
    assert result.exit_code == 0, result.output
    assert "MISSING" not in result.output and "All needed files in place." in result.output
    (weights_dir / "passt-s-f128-p16-s10-ap.476-swa.pt").unlink()  # evaluate's KL_PaSST only: optional
    result = runner.invoke(app, ["doctor", "--variant", "small_16k", "--weights-dir", str(weights_dir)])
    assert result.exit_code == 0 and "Optional and missing: PaSST-S (KL_PaSST)" in result.output

    result = runner.invoke(app, ["download", "--variant", "small_16k", "--weights-dir", str(weights_dir),
                                 "--mirror", url])
    assert result.exit_code == 0 and (weights_dir / "passt-s-f128-p16-s10-ap.476-swa.pt").is_file()
    result = runner.invoke(app, ["download", "--variant", "small_16k", "--weights-dir", str(weights_dir),
                                 "--mirror", url])
    assert "Nothing to download" in result.output


def test_44k_needs_the_vocoder_config_and_reads_it(tmp_path):
    """The 44k vocoder's architecture comes from its config.json beside the weights."""
    from shared.models.vocoder import bigvgan_generator
    from shared.pretrained import load_vocoder, vocoder_hyperparameters

    names = [wf.filename for wf, _ in needed_files("large_44k_v2")]
    assert "config.json" in names and "bigvgan_generator.pt" in names and "v1-44.pth" in names
    folder = tmp_path / VOCODER_WEIGHTS["44k"].relative_path.parent
    folder.mkdir()
    config = vocoder_hyperparameters("44k", profile="tiny")
    (folder / "config.json").write_text(json.dumps(config))
    generator = bigvgan_generator(config)
    torch.save({"generator": generator.state_dict()}, folder / "bigvgan_generator.pt")
    assert resolve(VOCODER_WEIGHTS["44k"], tmp_path) == folder / "bigvgan_generator.pt"
    vocoder = load_vocoder("44k", weights_dir=tmp_path)
    assert vocoder(torch.zeros(1, 128, 4)).shape == (1, 1, 4 * 512)
