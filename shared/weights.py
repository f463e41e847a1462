"""Where every official weight file comes from, where we look for it, and fetching it.

One resolver for all files: `--weights-dir` (default `data/weights`, or $MMAUDIO_LORA_WEIGHTS)
holding the official file names; the two Hugging Face models (CLIP, BigVGAN v2) may also sit in
a folder named after their repository there, or in the Hugging Face cache (read offline).
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserError
from shared.models.sequence import DEFAULT_VARIANT, VARIANT_MODES

log = logging.getLogger(__name__)

MMAUDIO_HUB = "https://huggingface.co/hkchengrex/MMAudio/resolve/main/weights"
MMAUDIO_RELEASE = "https://github.com/hkchengrex/MMAudio/releases/download/v0.1"
HF_HUB = "https://huggingface.co"


@dataclass(frozen=True)
class WeightFile:
    filename: str
    purpose: str
    url: str
    md5: str | None = None
    approx_bytes: int | None = None  # from the parameter count; no official size is published
    hf_repo: str | None = None  # Hugging Face repository (these live in weights_dir/<repo name>/)

    @property
    def relative_path(self) -> Path:
        return Path(self.hf_repo.split("/")[-1], self.filename) if self.hf_repo else Path(self.filename)


def _network_file(variant: str, md5: str, millions: float) -> WeightFile:
    name = f"mmaudio_{variant}.pth"
    return WeightFile(name, f"network {variant}", f"{MMAUDIO_HUB}/{name}", md5, int(millions * 4e6))


NETWORK_WEIGHTS: dict[str, WeightFile] = {
    "small_16k": _network_file("small_16k", "af93cde404179f58e3919ac085b8033b", 157.3),
    "small_44k": _network_file("small_44k", "babd74c884783d13701ea2820a5f5b6d", 157.4),
    "medium_44k": _network_file("medium_44k", "5a56b6665e45a1e65ada534defa903d0", 621.8),
    "large_44k": _network_file("large_44k", "fed96c325a6785b85ce75ae1aafd2673", 1030.0),
    "large_44k_v2": _network_file("large_44k_v2", "01ad4464f049b2d7efdaa4c1a59b8dfe", 1030.6),
}
VAE_WEIGHTS: dict[str, WeightFile] = {
    "16k": WeightFile("v1-16.pth", "VAE 16k", f"{MMAUDIO_RELEASE}/v1-16.pth",
                      "69f56803f59a549a1a507c93859fd4d7", int(171.7e6 * 4)),
    "44k": WeightFile("v1-44.pth", "VAE 44k", f"{MMAUDIO_RELEASE}/v1-44.pth",
                      "fab020275fa44c6589820ce025191600", int(305.5e6 * 4)),
}
_BIGVGAN_V2 = "nvidia/bigvgan_v2_44khz_128band_512x"
VOCODER_WEIGHTS: dict[str, WeightFile] = {
    "16k": WeightFile("best_netG.pt", "vocoder 16k", f"{MMAUDIO_RELEASE}/best_netG.pt",
                      "eeaf372a38a9c31c362120aba2dde292", int(112.2e6 * 4)),
    "44k": WeightFile("bigvgan_generator.pt", "vocoder 44k",
                      f"{HF_HUB}/{_BIGVGAN_V2}/resolve/main/bigvgan_generator.pt", hf_repo=_BIGVGAN_V2),
}
VOCODER_44K_CONFIG = WeightFile("config.json", "vocoder 44k configuration",
                                f"{HF_HUB}/{_BIGVGAN_V2}/resolve/main/config.json", hf_repo=_BIGVGAN_V2)
SYNCHFORMER_WEIGHTS = WeightFile("synchformer_state_dict.pth", "Synchformer",
                                 f"{MMAUDIO_RELEASE}/synchformer_state_dict.pth",
                                 "5b2f5594b0730f70e41e549b7c94390c")
# PaSST-S for evaluate's KL_PaSST (av-benchmark's sound-class metric). Its author publishes no
# checksum: the transfer is checked by its announced size, the content by a strict load.
PASST_WEIGHTS = WeightFile("passt-s-f128-p16-s10-ap.476-swa.pt", "PaSST-S (KL_PaSST)",
                           "https://github.com/kkoutini/PaSST/releases/download/v0.0.1-audioset/"
                           "passt-s-f128-p16-s10-ap.476-swa.pt", approx_bytes=86_153_758 * 4)
# Files a command runs without, leaving out what they serve (and saying so).
OPTIONAL_FILES = (PASST_WEIGHTS,)
_DFN5B = "apple/DFN5B-CLIP-ViT-H-14-384"
CLIP_WEIGHTS = WeightFile("open_clip_pytorch_model.bin", "CLIP ViT-H-14 (DFN5B)",
                          f"{HF_HUB}/{_DFN5B}/resolve/main/open_clip_pytorch_model.bin",
                          approx_bytes=int(986e6 * 4), hf_repo=_DFN5B)


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


def require(weight_file: WeightFile, weights_dir: str | os.PathLike | None = None) -> Path:
    path = resolve(weight_file, weights_dir)
    if path is None:
        where = Path(weights_dir or default_weights_dir()) / weight_file.relative_path
        raise MissingWeightsError(
            f"{weight_file.purpose}: {where} not found; run `mmaudio-lora download` or fetch {weight_file.url}")
    return path


@dataclass(frozen=True)
class FileStatus:
    weight_file: WeightFile
    commands: tuple[str, ...]
    path: Path | None  # None when missing

    @property
    def found(self) -> bool:
        return self.path is not None

    @property
    def optional(self) -> bool:
        return self.weight_file in OPTIONAL_FILES


def check_files(variant: str = DEFAULT_VARIANT, weights_dir: str | os.PathLike | None = None) -> list[FileStatus]:
    return [FileStatus(weight_file, commands, resolve(weight_file, weights_dir))
            for weight_file, commands in needed_files(variant)]


# -- downloading ------------------------------------------------------------------------------

class DownloadError(UserError, RuntimeError):
    pass


def md5sum(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fetch_once(url: str, partial: Path, progress) -> int | None:
    """Append the rest of `url` to `partial`; returns the total size the server announced."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing left to fetch
            return have
        raise
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
            while block := response.read(1 << 20):
                handle.write(block)
                progress.update(len(block))
    return total


def download_file(url: str, destination: Path, *, md5: str | None = None, attempts: int = 5) -> Path:
    """Fetch `url` into `destination`, resuming a partial `.part` file, verifying, renaming atomically."""
    from shared.progress import progress as progress_bar

    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    total = None
    with progress_bar(desc=destination.name, unit="B", unit_scale=True, leave=False) as progress:
        for attempt in range(1, attempts + 1):
            try:
                total = _fetch_once(url, partial, progress)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
                log.warning("%s: transfer interrupted (%s); resuming (%d/%d)", destination.name, error,
                            attempt, attempts)
                continue
            if total is None or partial.stat().st_size >= total:
                break
            log.warning("%s: transfer ended early; resuming (%d/%d)", destination.name, attempt, attempts)
        else:
            raise DownloadError(f"{url}: gave up after {attempts} attempts; run again to resume")
    size = partial.stat().st_size
    if total is not None and size != total:
        partial.unlink()
        raise DownloadError(f"{url}: got {size} bytes, the server announced {total}; removed, run again")
    if md5 is not None and (found := md5sum(partial)) != md5:
        partial.unlink()
        raise DownloadError(f"{url}: checksum mismatch (md5 {found}, expected {md5}); the file was removed")
    os.replace(partial, destination)
    return destination


def download_missing(variant: str = DEFAULT_VARIANT, weights_dir: str | os.PathLike | None = None,
                     mirror: str | None = None) -> list[Path]:
    """Download every file of `variant` that `resolve` cannot find. `mirror` serves files by name."""
    weights_dir = Path(weights_dir or default_weights_dir())
    fetched = []
    for weight_file, _ in needed_files(variant):
        if resolve(weight_file, weights_dir) is not None:
            continue
        url = f"{mirror.rstrip('/')}/{weight_file.filename}" if mirror else weight_file.url
        log.info("downloading %s (%s)", weight_file.filename, weight_file.purpose)
        fetched.append(download_file(url, weights_dir / weight_file.relative_path, md5=weight_file.md5))
    return fetched
