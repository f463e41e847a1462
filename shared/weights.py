"""Where every official weight file comes from, where we look for it, and fetching it.

One resolver for all files: `--weights-dir` (default `data/weights`, or $MMAUDIO_LORA_WEIGHTS)
holding the official file names; the two Hugging Face models (CLIP, BigVGAN v2) may also sit in
a folder named after their repository there, or in the Hugging Face cache (read offline).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import http.client
import urllib.error
import urllib.parse
import urllib.request
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserError
from shared.models.sequence import DEFAULT_VARIANT, VARIANT_MODES

log = logging.getLogger(__name__)

MMAUDIO_HUB = "https://huggingface.co/hkchengrex/MMAudio/resolve/main/weights"
MMAUDIO_RELEASE = "https://github.com/hkchengrex/MMAudio/releases/download/v0.1"
HF_HUB = "https://huggingface.co"


# Sizes are known approximately (float32 parameters, counted from the architectures; no official
# size is published): a file further than this from its size is damaged (cut short by a full disk
# or an interrupted copy, or a web page saved under its name). md5 (where published) checks the rest.
SIZE_TOLERANCE = 0.25


@dataclass(frozen=True)
class WeightFile:
    filename: str
    purpose: str
    url: str
    md5: str | None = None
    approx_bytes: int | None = None  # from the parameter count; no official size is published
    hf_repo: str | None = None  # Hugging Face repository (these live in weights_dir/<repo name>/)
    alias: str = ""  # a short name for `download --force` (network, vae, vocoder, ...)

    @property
    def relative_path(self) -> Path:
        return Path(self.hf_repo.split("/")[-1], self.filename) if self.hf_repo else Path(self.filename)

    def damage(self, path: Path) -> str | None:
        """Why the file at `path` cannot be this weight file, by its size and first bytes; None when
        it looks right (md5, where known, is checked by `download` and `doctor --verify`)."""
        size = path.stat().st_size
        if looks_like_html(path):
            return f"{size:,} bytes that look like an HTML page (a captive portal or a sign-in page?)"
        if self.approx_bytes and abs(size - self.approx_bytes) > SIZE_TOLERANCE * self.approx_bytes:
            return f"{size:,} bytes where about {self.approx_bytes:,} are expected (cut short?)"
        if self.filename.endswith(".json"):
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                return f"{size:,} bytes that are not JSON"
        return None


def looks_like_html(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head[:200]


def _network_file(variant: str, md5: str, millions: float) -> WeightFile:
    name = f"mmaudio_{variant}.pth"
    return WeightFile(name, f"network {variant}", f"{MMAUDIO_HUB}/{name}", md5, int(millions * 4e6), alias="network")


NETWORK_WEIGHTS: dict[str, WeightFile] = {
    "small_16k": _network_file("small_16k", "af93cde404179f58e3919ac085b8033b", 157.3),
    "small_44k": _network_file("small_44k", "babd74c884783d13701ea2820a5f5b6d", 157.4),
    "medium_44k": _network_file("medium_44k", "5a56b6665e45a1e65ada534defa903d0", 621.8),
    "large_44k": _network_file("large_44k", "fed96c325a6785b85ce75ae1aafd2673", 1030.0),
    "large_44k_v2": _network_file("large_44k_v2", "01ad4464f049b2d7efdaa4c1a59b8dfe", 1030.6),
}
VAE_WEIGHTS: dict[str, WeightFile] = {
    "16k": WeightFile("v1-16.pth", "VAE 16k", f"{MMAUDIO_RELEASE}/v1-16.pth",
                      "69f56803f59a549a1a507c93859fd4d7", int(171.7e6 * 4), alias="vae"),
    "44k": WeightFile("v1-44.pth", "VAE 44k", f"{MMAUDIO_RELEASE}/v1-44.pth",
                      "fab020275fa44c6589820ce025191600", int(305.5e6 * 4), alias="vae"),
}
_BIGVGAN_V2 = "nvidia/bigvgan_v2_44khz_128band_512x"
VOCODER_WEIGHTS: dict[str, WeightFile] = {
    "16k": WeightFile("best_netG.pt", "vocoder 16k", f"{MMAUDIO_RELEASE}/best_netG.pt",
                      "eeaf372a38a9c31c362120aba2dde292", int(112.2e6 * 4), alias="vocoder"),
    # 122.18 M parameters (its config's architecture, counted)
    "44k": WeightFile("bigvgan_generator.pt", "vocoder 44k",
                      f"{HF_HUB}/{_BIGVGAN_V2}/resolve/main/bigvgan_generator.pt", approx_bytes=int(122.18e6 * 4),
                      hf_repo=_BIGVGAN_V2, alias="vocoder"),
}
VOCODER_44K_CONFIG = WeightFile("config.json", "vocoder 44k configuration",
                                f"{HF_HUB}/{_BIGVGAN_V2}/resolve/main/config.json", hf_repo=_BIGVGAN_V2,
                                alias="vocoder-config")
# 237.46 M parameters: the visual and audio branches and the sync head (the reference's manifest)
SYNCHFORMER_WEIGHTS = WeightFile("synchformer_state_dict.pth", "Synchformer",
                                 f"{MMAUDIO_RELEASE}/synchformer_state_dict.pth",
                                 "5b2f5594b0730f70e41e549b7c94390c", int(237.46e6 * 4), alias="synchformer")
# PaSST-S for evaluate's KL_PaSST (av-benchmark's sound-class metric). Its author publishes no
# checksum: the transfer is checked by its announced size, the content by a strict load.
PASST_WEIGHTS = WeightFile("passt-s-f128-p16-s10-ap.476-swa.pt", "PaSST-S (KL_PaSST)",
                           "https://github.com/kkoutini/PaSST/releases/download/v0.0.1-audioset/"
                           "passt-s-f128-p16-s10-ap.476-swa.pt", approx_bytes=86_153_758 * 4, alias="passt")
# Files a command runs without, leaving out what they serve (and saying so).
OPTIONAL_FILES = (PASST_WEIGHTS,)
_DFN5B = "apple/DFN5B-CLIP-ViT-H-14-384"
CLIP_WEIGHTS = WeightFile("open_clip_pytorch_model.bin", "CLIP ViT-H-14 (DFN5B)",
                          f"{HF_HUB}/{_DFN5B}/resolve/main/open_clip_pytorch_model.bin",
                          approx_bytes=int(986e6 * 4), hf_repo=_DFN5B, alias="clip")


def needed_files(variant: str = DEFAULT_VARIANT) -> list[tuple[WeightFile, tuple[str, ...]]]:
    """Every file the real profile of a variant uses, with the commands that need it."""
    from shared.models.network import VARIANTS

    if variant not in VARIANTS:
        raise UserError(f"unknown network variant {variant!r}; expected one of {sorted(VARIANTS)}")
    mode = VARIANT_MODES[variant]
    files = [
        (NETWORK_WEIGHTS[variant], ("train", "generate", "evaluate")),
        (VAE_WEIGHTS[mode], ("features", "generate", "evaluate")),
        (SYNCHFORMER_WEIGHTS, ("features", "generate", "evaluate")),  # evaluate: DeSync's audio branch
        (CLIP_WEIGHTS, ("features", "generate")),
        (VOCODER_WEIGHTS[mode], ("generate", "evaluate")),
    ]
    if mode == "44k":
        files.append((VOCODER_44K_CONFIG, ("generate", "evaluate")))
    files.append((PASST_WEIGHTS, ("evaluate: KL_PaSST, optional",)))
    return files


def default_weights_dir() -> Path:
    return Path(os.environ.get("MMAUDIO_LORA_WEIGHTS", "data/weights"))


def _hf_cache_path(weight_file: WeightFile) -> Path | None:
    if weight_file.hf_repo is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(weight_file.hf_repo, weight_file.filename)
    return Path(found) if isinstance(found, str) else None


def resolve(weight_file: WeightFile, weights_dir: str | os.PathLike | None = None) -> Path | None:
    """The file's path if it is present: in the weights folder first, then the HF cache."""
    local = Path(weights_dir or default_weights_dir()) / weight_file.relative_path
    if local.is_file():
        return local
    return _hf_cache_path(weight_file)


class MissingWeightsError(UserError, FileNotFoundError):
    pass


class DamagedWeightsError(MissingWeightsError):
    """The file is there but cannot be the weight file (its size, a web page): as good as missing."""


def require(weight_file: WeightFile, weights_dir: str | os.PathLike | None = None) -> Path:
    path = resolve(weight_file, weights_dir)
    if path is None:
        where = Path(weights_dir or default_weights_dir()) / weight_file.relative_path
        raise MissingWeightsError(
            f"{weight_file.purpose}: {where} not found; run `mmaudio-lora download` or fetch {weight_file.url}")
    if looks_like_html(path):  # sizes are doctor's and download's to check; a web page is never weights
        raise DamagedWeightsError(f"{weight_file.purpose}: {path} is damaged ({path.stat().st_size:,} bytes that look "
                                  "like an HTML page); run `mmaudio-lora download --force "
                                  f"{weight_file.alias or weight_file.filename}`")
    return path


@dataclass(frozen=True)
class FileStatus:
    weight_file: WeightFile
    commands: tuple[str, ...]
    path: Path | None  # None when missing
    damage: str | None = None  # why the file found is not the weight file (its size, an HTML page)

    @property
    def found(self) -> bool:
        return self.path is not None

    @property
    def usable(self) -> bool:
        return self.path is not None and self.damage is None

    @property
    def fix(self) -> str:
        """The one command that fetches this file again."""
        return f"mmaudio-lora download --force {self.weight_file.alias or self.weight_file.filename}"

    @property
    def optional(self) -> bool:
        return self.weight_file.filename in {f.filename for f in OPTIONAL_FILES}


def check_files(variant: str = DEFAULT_VARIANT, weights_dir: str | os.PathLike | None = None) -> list[FileStatus]:
    """Every file of the variant: where it is, and whether its size (and first bytes) say it is damaged."""
    statuses = []
    for weight_file, commands in needed_files(variant):
        path = resolve(weight_file, weights_dir)
        statuses.append(FileStatus(weight_file, commands, path, weight_file.damage(path) if path else None))
    return statuses


def verify(statuses: list[FileStatus], show_progress: bool = True) -> list[FileStatus]:
    """The statuses with each found file's md5 compared where one is published (a progress bar
    over the bytes read: a few seconds per GB)."""
    from shared.progress import progress as progress_bar

    checked = [s for s in statuses if s.usable and s.weight_file.md5]
    total = sum(s.path.stat().st_size for s in checked)
    result = []
    with progress_bar(total=total, desc="md5", unit="B", unit_scale=True, disable=not show_progress) as progress:
        for status in statuses:
            if status in checked and (found := md5sum(status.path, progress=progress)) != status.weight_file.md5:
                status = dataclasses.replace(status, damage=f"md5 {found}, not the published "
                                                            f"{status.weight_file.md5}")
            result.append(status)
    return result


# -- downloading ------------------------------------------------------------------------------

class DownloadError(UserError, RuntimeError):
    pass


def md5sum(path: Path, chunk: int = 1 << 22, progress=None) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
            if progress is not None:
                progress.update(len(block))
    return digest.hexdigest()


class _Retry(Exception):
    """A transfer that may heal if tried again (a dropped connection, a timeout, a 5xx)."""


def _network_failure(url: str, error: BaseException) -> Exception:
    """What a failed request means: _Retry when trying again can help, else a DownloadError naming
    the cause and the fix."""
    host = urllib.parse.urlsplit(url).netloc
    if isinstance(error, urllib.error.HTTPError):
        if error.code >= 500 or error.code == 429:
            return _Retry(f"the server answered {error.code}")
        return DownloadError(f"{url}: the server answered {error.code} {error.reason}: it does not serve this file; "
                             "check --mirror (it must serve the official file names), or fetch the file by hand into "
                             "--weights-dir")
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, socket.gaierror):
        return DownloadError(f"{url}: cannot find the host {host} (no network, or a name the DNS does not know); "
                             "check the connection, or give --mirror")
    if isinstance(reason, ConnectionRefusedError):
        return DownloadError(f"{url}: {host} refused the connection (nothing serves there); check the address, or "
                             "give another --mirror")
    if isinstance(reason, (OSError, http.client.HTTPException)):  # reset, timed out, cut off mid-transfer
        return _Retry(str(reason) or type(reason).__name__)
    return DownloadError(f"{url}: {reason}")


def _fetch_once(url: str, partial: Path, progress) -> int | None:
    """Append the rest of `url` to `partial`; returns the total size the server announced. Network
    failures come out as `_network_failure` says; the partial file's own as OSError."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing left to fetch
            return have
        raise _network_failure(url, error) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise _network_failure(url, error) from None
    with response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        total = None
        if response.status == 206 and "Content-Range" in response.headers:
            total = int(response.headers["Content-Range"].rsplit("/", 1)[-1])
        elif response.headers.get("Content-Length"):
            total = int(response.headers["Content-Length"])
        progress.reset(total=total)
        progress.update(have)
        with open(partial, "ab" if have else "wb") as handle:
            while True:
                try:
                    block = response.read(1 << 20)
                except (OSError, http.client.HTTPException) as error:
                    raise _network_failure(url, error) from None
                if not block:
                    break
                handle.write(block)
                progress.update(len(block))
    return total


def check_writable(folder: Path) -> None:
    """The weights folder can take files: made if needed, a file written and removed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise DownloadError(f"{folder}: cannot write there ({error.strerror or error}); give a writable "
                            "--weights-dir") from None


def download_file(url: str, destination: Path, *, weight_file: WeightFile | None = None, md5: str | None = None,
                  attempts: int = 5) -> Path:
    """Fetch `url` into `destination`, resuming a partial `.part` file; what arrived is checked
    (md5 where known, else the announced and the expected size, and never a web page) before it is
    renamed into place, atomically. Only failures that can heal are retried."""
    from shared.progress import progress as progress_bar

    md5 = md5 or (weight_file.md5 if weight_file else None)
    check_writable(destination.parent)
    partial = destination.with_name(destination.name + ".part")
    total = None
    with progress_bar(desc=destination.name, unit="B", unit_scale=True, leave=False) as progress:
        for attempt in range(1, attempts + 1):
            try:
                total = _fetch_once(url, partial, progress)
            except _Retry as why:
                log.warning("%s: transfer interrupted (%s); resuming (%d/%d)", destination.name, why, attempt,
                            attempts)
                continue
            except OSError as error:  # the partial file itself (the disk, the folder)
                raise DownloadError(f"{partial}: cannot write ({error.strerror or error}); free some space or give "
                                    "a writable --weights-dir") from None
            if total is None or partial.stat().st_size >= total:
                break
            log.warning("%s: transfer ended early; resuming (%d/%d)", destination.name, attempt, attempts)
        else:
            raise DownloadError(f"{url}: the transfer kept breaking off ({attempts} attempts); run again to resume "
                                "from where it stopped")
    _check_arrival(url, partial, total, md5, weight_file)
    os.replace(partial, destination)
    return destination


def _check_arrival(url: str, partial: Path, total: int | None, md5: str | None, weight_file: WeightFile | None) -> None:
    """Refuse what arrived unless it is the file: nothing stays under the final name, and the
    message says what came (its size, an HTML page)."""
    size = partial.stat().st_size
    problem = None
    if looks_like_html(partial):
        problem = f"{size:,} bytes that look like an HTML page (a captive portal or a proxy's sign-in page?)"
    elif total is not None and size != total:
        problem = f"{size:,} bytes where the server announced {total:,}"
    elif md5 is not None and (found := md5sum(partial)) != md5:
        problem = f"{size:,} bytes with md5 {found}, not the published {md5}"
    elif md5 is None and weight_file is not None and (damage := weight_file.damage(partial)):
        problem = damage
    if problem is not None:
        partial.unlink()
        raise DownloadError(f"{url}: arrived as {problem}; nothing was kept. Check the connection or --mirror, "
                            "then run again")


def download_missing(variant: str = DEFAULT_VARIANT, weights_dir: str | os.PathLike | None = None,
                     mirror: str | None = None, force: tuple[str, ...] = ()) -> list[Path]:
    """Download every file of `variant` that is missing or damaged (by its size), and the files
    named in `force` (file names or short names: network, vae, vocoder, synchformer, clip, passt)
    again. `mirror` serves files by name."""
    weights_dir = Path(weights_dir or default_weights_dir())
    statuses = check_files(variant, weights_dir)
    known = {name for s in statuses for name in (s.weight_file.filename, s.weight_file.alias) if name}
    unknown = sorted(set(force) - known)
    if unknown:
        raise DownloadError(f"--force {', '.join(unknown)}: not a file of {variant}; one of {', '.join(sorted(known))}")
    check_writable(weights_dir)
    fetched = []
    for status in statuses:
        weight_file = status.weight_file
        forced = {weight_file.filename, weight_file.alias} & set(force)
        if status.usable and not forced:
            continue
        if status.damage:
            log.warning("%s: %s; fetching it again", status.path, status.damage)
        url = f"{mirror.rstrip('/')}/{weight_file.filename}" if mirror else weight_file.url
        log.info("downloading %s (%s)", weight_file.filename, weight_file.purpose)
        fetched.append(download_file(url, weights_dir / weight_file.relative_path, weight_file=weight_file))
    return fetched
