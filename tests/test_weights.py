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

    def __init__(self, files, cut_once=(), failing=()):
        self.files, self.cut_once, self.failing, self.requests = files, set(cut_once), set(failing), []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        name = self.path.lstrip("/")
        server.requests.append((name, self.headers.get("Range")))
        if name in server.failing:  # a server error that heals
            server.failing.discard(name)
            self.send_error(503)
            return
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

    def start(files, cut_once=(), failing=()):
        instance = _Server(files, cut_once, failing)
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
    with pytest.raises(DownloadError, match="with md5 .*, not the published"):
        download_file(f"{url}/v1-16.pth", tmp_path / "v1-16.pth", md5=hashlib.md5(PAYLOAD).hexdigest())
    assert not (tmp_path / "v1-16.pth").exists() and not list(tmp_path.glob("*.part"))


def test_doctor_and_download_commands(server, tmp_path, monkeypatch):
    """doctor fails while files are missing, download fetches them from a mirror, then doctor passes."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    files = {wf.filename: wf.filename.encode() * 10 for wf, _ in needed_files("small_16k")}
    # The official md5 sums and sizes cannot match these stand-in files: the same list with theirs.
    stand_ins = [(dataclasses.replace(wf, md5=hashlib.md5(files[wf.filename]).hexdigest(),
                                      approx_bytes=len(files[wf.filename])), cmds)
                 for wf, cmds in needed_files("small_16k")]
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
    assert result.exit_code == 0 and "Optional and missing or damaged: PaSST-S (KL_PaSST)" in result.output

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


def _stand_ins(monkeypatch, tmp_path, variant="small_16k"):
    """Small stand-in files for a variant's weights, with their own md5 and size in the table."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    files = {wf.filename: wf.filename.encode() * 1000 for wf, _ in needed_files(variant)}
    table = [(dataclasses.replace(wf, md5=hashlib.md5(files[wf.filename]).hexdigest(),
                                  approx_bytes=len(files[wf.filename])), cmds) for wf, cmds in needed_files(variant)]
    monkeypatch.setattr(weights, "needed_files", lambda variant: table)
    return files


def test_damaged_files_are_found_named_and_fetched_again(server, tmp_path, monkeypatch):
    """A file cut short is DAMAGED for doctor (with the command that fixes it) and fetched again by
    download; a wrong md5 is found by doctor --verify; download --force fetches a named file again."""
    files = _stand_ins(monkeypatch, tmp_path)
    _, url = server(files)
    runner = CliRunner()
    folder = tmp_path / "weights"
    args = ["--variant", "small_16k", "--weights-dir", str(folder)]
    assert runner.invoke(app, ["download", *args, "--mirror", url]).exit_code == 0
    vae = folder / "v1-16.pth"
    vae.write_bytes(files["v1-16.pth"][:100])  # a copy stopped by a full disk
    result = runner.invoke(app, ["doctor", *args])
    assert result.exit_code == 1 and "DAMAGED" in result.output and "mmaudio-lora download --force vae" in result.output
    again = runner.invoke(app, ["download", *args, "--mirror", url])
    assert again.exit_code == 0 and "1 file(s) downloaded" in again.output and vae.read_bytes() == files["v1-16.pth"]
    flipped = bytearray(files["v1-16.pth"])
    flipped[7] ^= 1
    vae.write_bytes(bytes(flipped))  # same size, other bytes
    assert runner.invoke(app, ["doctor", *args]).exit_code == 0
    verified = runner.invoke(app, ["doctor", *args, "--verify"])
    assert verified.exit_code == 1 and "md5" in verified.output and "--force vae" in verified.output
    forced = runner.invoke(app, ["download", *args, "--mirror", url, "--force", "vae"])
    assert forced.exit_code == 0 and vae.read_bytes() == files["v1-16.pth"]
    unknown = runner.invoke(app, ["download", *args, "--mirror", url, "--force", "nonsense"])
    assert unknown.exit_code == 1 and "not a file of small_16k" in unknown.output


def test_a_web_page_is_never_installed_as_weights(server, tmp_path, monkeypatch):
    """A captive portal's 58-byte page served with status 200 under PaSST's name: refused, nothing
    under the final name; and a PaSST file that is such a page leaves KL_PaSST out, said."""
    from evaluate.held_out import Judges
    from shared.runtime import Runtime
    from shared.weights import PASST_WEIGHTS, require

    page = b"<html><body>Please sign in to the network</body></html>\n"
    _, url = server({PASST_WEIGHTS.filename: page})
    target = tmp_path / "w" / PASST_WEIGHTS.filename
    with pytest.raises(DownloadError, match="look like an HTML page"):
        download_file(f"{url}/{PASST_WEIGHTS.filename}", target, weight_file=PASST_WEIGHTS)
    assert not target.exists() and not list(target.parent.glob("*.part"))
    target.write_bytes(page)  # installed by an older version
    monkeypatch.setattr(Runtime, "passt", lambda self: require(PASST_WEIGHTS, tmp_path / "w"))
    judges = Judges(Runtime(mode="16k", profile="tiny", device="cpu"))
    assert judges.passt is None and "HTML page" in judges.left_out[0] and "--force passt" in judges.left_out[0]


def test_download_errors_name_their_cause_and_only_what_can_heal_is_retried(server, tmp_path, caplog):
    """A 404, a refused connection and an unwritable folder fail at once in one line; a 503 heals."""
    import socket

    payload = b"x" * 5000
    instance, url = server({"good.pt": payload}, failing={"good.pt"})
    with caplog.at_level("WARNING"):
        download_file(f"{url}/good.pt", tmp_path / "good.pt", md5=hashlib.md5(payload).hexdigest())
    assert (tmp_path / "good.pt").read_bytes() == payload and len(instance.requests) == 2
    assert "503" in caplog.text
    caplog.clear()
    with pytest.raises(DownloadError, match="404 .*--mirror"):
        download_file(f"{url}/missing.pt", tmp_path / "missing.pt")
    assert [r for r, _ in instance.requests].count("missing.pt") == 1 and "resuming" not in caplog.text
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with pytest.raises(DownloadError, match="refused the connection"):
        download_file(f"http://127.0.0.1:{port}/x.pt", tmp_path / "x.pt")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DownloadError, match="cannot write there.*writable --weights-dir"):
        download_file(f"{url}/good.pt", blocker / "good.pt")
    assert "resuming" not in caplog.text
