"""The `mmaudio-lora` command: a thin shell over the stages' library functions.

Heavy imports (torch, models) happen inside the commands so that `--help` stays instant.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from mmaudio_lora import __version__
from shared.errors import UserError, describe_os_error

app = typer.Typer(
    help="Fine-tune MMAudio with LoRA on your own videos: precompute features, train, generate.",
    no_args_is_help=True,
    add_completion=False,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"mmaudio-lora {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


LICENCE_NOTE = ("MMAudio's code is MIT, but its checkpoints are CC-BY-NC 4.0 (non-commercial) and were "
                "trained on datasets with their own licences: check before any commercial use.")

VARIANT_HELP = "Network variant: small_16k, small_44k, medium_44k, large_44k or large_44k_v2."
PRECISION_HELP = "auto (bf16 autocast on CUDA, float32 on the CPU), bf16 or fp32."
WEIGHTS_HELP = "Folder holding the official weight files by name [default: data/weights, or $MMAUDIO_LORA_WEIGHTS]."


@contextmanager
def user_errors() -> Iterator[None]:
    """The user's mistakes and OS refusals (permissions, full disk) as one line and exit 1;
    anything else is a bug and keeps its traceback."""
    try:
        yield
    except UserError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1)
    except OSError as error:
        typer.echo(f"error: {describe_os_error(error)}", err=True)
        raise typer.Exit(1)


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e8 else f"{num_bytes / 1e6:.1f} MB"


@app.command()
def doctor(
    variant: str = typer.Option("large_44k_v2", help=VARIANT_HELP),
    weights_dir: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    verify: bool = typer.Option(False, "--verify", help="Also compare each file's md5 with the published one "
                                "(reads every file: about 10 s per GB from disk)."),
) -> None:
    """Check that every weight file of a variant is in place and whole (its size; md5 with
    --verify), and whether CUDA is usable.

    Exits non-zero when a needed file is missing or damaged; a damaged file is named with the
    command that fetches it again."""
    from shared.device import cuda_status
    from shared.runtime import mode_of
    from shared.weights import check_files, default_weights_dir, verify as verify_md5

    try:
        statuses = check_files(variant, weights_dir)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--variant")
    if verify:
        statuses = verify_md5(statuses)
    typer.echo(f"variant {variant} (audio {mode_of(variant)}), weights folder {weights_dir or default_weights_dir()}")
    for status in statuses:
        wf = status.weight_file
        needed_by = ", ".join(status.commands)
        if status.damage:
            typer.echo(f"  DAMAGED  {wf.purpose:<26} {status.path}: {status.damage}  [{needed_by}]; fix: "
                       f"`{status.fix}`")
        elif status.found:
            checked = " md5 ok" if verify and wf.md5 else ""
            typer.echo(f"  found    {wf.purpose:<26} {status.path} ({_size(status.path.stat().st_size)}{checked})"
                       f"  [{needed_by}]")
        else:
            size = f"about {_size(wf.approx_bytes)}" if wf.approx_bytes else "size not published"
            typer.echo(f"  MISSING  {wf.purpose:<26} {wf.relative_path}  from {wf.url} ({size})  [{needed_by}]")
    typer.echo(f"CUDA: {cuda_status()}")
    typer.echo(f"Licence: {LICENCE_NOTE}")
    broken = [s for s in statuses if not s.usable and not s.optional]
    if broken:
        typer.echo(f"{len(broken)} file(s) missing or damaged: run `mmaudio-lora download --variant {variant}` "
                   "(it fetches both).")
        raise typer.Exit(1)
    optional = [s.weight_file.purpose for s in statuses if not s.usable and s.optional]
    unverified = "" if verify else " Sizes checked; `doctor --verify` compares md5 too."
    typer.echo("All needed files in place." + (f" Optional and missing or damaged: {', '.join(optional)} (evaluate "
                                                 "leaves its metric out; `mmaudio-lora download` fetches it)."
                                                 if optional else "") + unverified)


@app.command()
def download(
    variant: str = typer.Option("large_44k_v2", help=VARIANT_HELP),
    weights_dir: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    mirror: Optional[str] = typer.Option(None, help="Base URL of a mirror serving the files by their official names."),
    force: list[str] = typer.Option([], help="Fetch this file again even if it is there (a file name or network, "
                                    "vae, vocoder, vocoder-config, synchformer, clip, passt; repeat)."),
) -> None:
    """Download the weight files of a variant that are missing or damaged (resumes partial files;
    checks md5 where published, else the size; never keeps a web page)."""
    from shared.weights import download_missing

    with user_errors():
        fetched = download_missing(variant, weights_dir, mirror, tuple(force))
    for path in fetched:
        typer.echo(f"downloaded {path} ({_size(path.stat().st_size)})")
    typer.echo("Nothing to download: all files in place." if not fetched else f"{len(fetched)} file(s) downloaded.")


@app.command()
def features(
    tsv: Path = typer.Option(Path("data/segmented_clips.tsv"), help="Clip list: `id, label` (MMAudio) or "
                             "`video_path, start_time, end_time, caption, ...` (segments)."),
    video_root: Path = typer.Option(Path("data/segmented_videos"), help="Folder the list's paths are relative to."),
    out: Path = typer.Option(Path("data/features/train"), help="Output folder (replaced atomically); new, empty "
                             "or one that `features` wrote."),
    profile: str = typer.Option("real", help="real: official weights; tiny: small deterministic models (tests, demo)."),
    variant: Optional[str] = typer.Option(None, help="The network variant you will train; it gives the audio "
                                          "mode [default: large_44k_v2, 44k]. " + VARIANT_HELP),
    mode: Optional[str] = typer.Option(None, help="The audio mode instead of a variant: 16k or 44k."),
    window: float = typer.Option(8.0, help="Model window in seconds: a multiple of 0.125 s from 0.75 s (the "
                                 "shortest that holds one Synchformer window of 0.64 s) to 8 s; shorter clips are "
                                 "padded, and `train` trains at the features' window."),
    strict: bool = typer.Option(False, help="Fail (non-zero exit, output unchanged) when any clip is skipped."),
    split_long: bool = typer.Option(False, help="Cut clips longer than the window into consecutive windows "
                                    "instead of keeping only the first."),
    device: str = typer.Option("auto", help="auto (CUDA when usable), cpu or cuda."),
    batch_size: int = typer.Option(8, min=1, help="Clips encoded together."),
    workers: Optional[int] = typer.Option(None, min=0, help="Decoding processes (DataLoader workers) "
                                          "[default: one per CPU core but one, at most 12; 0: in this process]."),
    weights_dir: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    allow_symlinks: bool = typer.Option(False, help="Accept symbolic links in the video root that lead "
                                        "outside it (data sets built from links)."),
    precision: str = typer.Option("auto", help="CLIP and Synchformer: " + PRECISION_HELP),
) -> None:
    """Precompute training features (ExtractedVGG memmaps) for a list of clips; only what changed."""
    from precompute.run import FeatureJob, run_features
    from shared.runtime import Runtime

    with user_errors():
        runtime = Runtime(variant=variant, mode=mode, profile=profile, weights_dir=weights_dir, device=device,
                          precision=precision)
        summary = run_features(FeatureJob(tsv=tsv, video_root=video_root, out=out, runtime=runtime,
                                          window_sec=window, strict=strict, split_long=split_long,
                                          batch_size=batch_size, workers=workers, allow_symlinks=allow_symlinks))
    if not summary.main_process:
        return
    if summary.up_to_date:
        typer.echo(f"{out}: up to date ({summary.clips} clips, {len(summary.skipped)} skipped), "
                   f"checked in {summary.seconds:.2f} s")
    else:
        for line in summary.skipped:
            typer.echo(f"skipped {line}")
        typer.echo(f"{out}: {summary.clips - len(summary.skipped)} clips written ({summary.encoded_media} encoded, "
                   f"{summary.encoded_text} captions encoded, {summary.padded} padded, {len(summary.skipped)} skipped) "
                   f"in {summary.seconds:.1f} s ({summary.clips_per_second:.2f} clips/s)")
        timings = summary.timings
        typer.echo(f"time: encoding {summary.encoding_seconds:.1f} s, waiting for decoding {timings.get('decode (waited for)', 0.0):.1f} s, "
                   f"loading models {timings.get('load models', 0.0):.1f} s, writing {timings.get('write', 0.0):.1f} s")
    typer.echo(f"sources: {summary.sources} source video{'s' if summary.sources != 1 else ''} ({summary.grouping}); "
               "validation holds out whole sources")
    if summary.skipped:
        typer.echo(f"skip report: {out / 'skipped.txt'}")


@app.command("train")
def train_command(
    features: list[Path] = typer.Option(..., "--features", help="Feature folder from `mmaudio-lora features` "
                                        "(repeat for several)."),
    run: Path = typer.Option(..., "--run", "--run-dir", help="Run folder: adapter, checkpoints, metrics.jsonl, "
                             "TensorBoard logs (under torchrun write --run-dir: torchrun claims --run)."),
    profile: Optional[str] = typer.Option(None, help="real: an official checkpoint; tiny: the small test network "
                                          "[default: real]."),
    checkpoint: Optional[Path] = typer.Option(None, help="Official network file (mmaudio_*.pth); real profile."),
    variant: Optional[str] = typer.Option(None, help=VARIANT_HELP + " Inferred from the checkpoint if omitted."),
    steps: Optional[int] = typer.Option(None, help="Total optimizer steps of the run [default 2000]."),
    batch_size: Optional[int] = typer.Option(None, help="Clips per step [default 8]."),
    config: Optional[Path] = typer.Option(None, help="TOML file with any option of train/config.py "
                                          "(rank, alpha, lr, warmup_steps, schedule, val_fraction, ...)."),
    rank: Optional[int] = typer.Option(None, help="LoRA rank [default 16]."),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha [default 16]."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate [default 1e-4]."),
    val_fraction: Optional[float] = typer.Option(None, help="Share of clips held out for validation [default 0.1]."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda [default auto]."),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP + " [default auto]"),
    seed: Optional[int] = typer.Option(None, help="Random seed [default 42]."),
    resume: bool = typer.Option(False, help="Continue from the run's last checkpoint up to --steps, with the "
                                "settings the run recorded (only steps, intervals, device and precision may change)."),
    overwrite: bool = typer.Option(False, help="Replace the run in --run (deleted whole) instead of refusing."),
) -> None:
    """Fine-tune the network with LoRA on precomputed features (encoders are never loaded).

    Settings: the defaults of train/config.py, then (with --resume) what the run recorded, then
    the --config file, then the options given here."""
    from shared.outputs import folder_kind
    from shared.run_record import CONFIG_FILE
    from train.config import TrainConfig, read_toml
    from train.loop import train

    with user_errors():
        continued = resume and folder_kind(run) == "run" and (run / CONFIG_FILE).is_file()
        settings = TrainConfig.from_recorded(run) if continued else TrainConfig()
        if config:
            settings.updated(read_toml(config), str(config))
        given = {"features": [str(f) for f in features], "run": str(run), "profile": profile,
                 "checkpoint": str(checkpoint) if checkpoint else None, "variant": variant, "steps": steps,
                 "batch_size": batch_size, "rank": rank, "alpha": alpha, "lr": lr, "val_fraction": val_fraction,
                 "device": device, "precision": precision, "seed": seed}
        settings.updated({key: value for key, value in given.items() if value is not None}, "command line")
        result = train(settings, resume=resume, overwrite=overwrite)
    if not result.main_process:
        return
    resumed = f" (now at step {result.steps})" if result.steps != result.steps_this_run else ""
    typer.echo(f"trained {result.steps_this_run} steps{resumed} in {result.seconds:.0f} s; LoRA parameters "
               f"{result.trainable_parameters:,} of {result.total_parameters:,}")
    typer.echo(result.validation)
    best = (f", best validation loss {result.best_val_loss:.4f} at step {result.best_step} "
            f"({run / 'best' / 'adapter'})") if result.best_val_loss is not None else ""
    last = (f"{result.last_train_loss:.4f}" if math.isfinite(result.last_train_loss) else
            "not finite: that step updated nothing")
    typer.echo(f"last training loss {last}{best}")
    if result.skipped_steps:
        typer.echo(f"warning: {result.skipped_steps} step(s) had a loss that was not finite and updated nothing "
                   f"(the last one {'included' if not math.isfinite(result.last_train_loss) else 'not'}); the "
                   f"adapter has {result.steps - result.skipped_steps} trained steps. If it recurs, lower the "
                   "learning rate.", err=True)
    if result.stopped_early:
        typer.echo(f"stopped early: no better validation loss in {settings.early_stopping_patience} validations; "
                   f"adapter/ holds the best one (step {result.best_step})")
    typer.echo(f"adapter: {run / 'adapter'}; metrics: {run / 'metrics.jsonl'}")


@app.command("crossval")
def crossval_command(
    features: list[Path] = typer.Option(..., "--features", help="Feature folder(s) from `mmaudio-lora features`."),
    run: Path = typer.Option(..., "--run", "--run-dir", help="Cross-validation folder: fold-k/ runs, crossval.json, "
                             "the report crossval/index.html."),
    folds: int = typer.Option(4, min=2, help="Folds of whole source videos (at most the number of sources)."),
    profile: Optional[str] = typer.Option(None, help="real or tiny [default: real]."),
    variant: Optional[str] = typer.Option(None, help=VARIANT_HELP),
    checkpoint: Optional[Path] = typer.Option(None, help="Official network file (mmaudio_*.pth); real profile."),
    steps: Optional[int] = typer.Option(None, help="Training steps of every fold [default 2000]."),
    batch_size: Optional[int] = typer.Option(None, help="Clips per training step [default 8]."),
    config: Optional[Path] = typer.Option(None, help="TOML file with any option of train/config.py (its "
                                          "validation split is replaced by the folds)."),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP + " [default auto]"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda [default auto]."),
    tuning_fraction: float = typer.Option(0.1, help="Share of each fold's training sources held out for its "
                                          "choices (best adapter, early stopping); 0: none, the last adapter."),
    seeds: int = typer.Option(3, min=1, help="Seeds per clip and model when scoring."),
    eval_steps: int = typer.Option(25, min=1, help="Euler steps of the generated audio when scoring."),
    cfg: float = typer.Option(4.5, min=0.0, help="Classifier-free guidance strength when scoring."),
    lora_scale: str = typer.Option("1", help="Adapter strength the verdict is for; several separated by commas "
                                   "add an exploration, pooled and shown beside the verdict (the verdict stays at 1 "
                                   "when listed, else the first)."),
    repeats: int = typer.Option(1, min=1, help="Cross-validations with other folds and training seeds; each "
                                "source's difference is averaged over its R judges, so the verdict speaks of the "
                                "recipe rather than of K particular adapters (R times the work)."),
    overwrite: bool = typer.Option(False, help="Start a new experiment in --run, deleting the cross-validation "
                                   "there (only what it wrote), instead of refusing other settings."),
) -> None:
    """Cross-validate by source video: K adapters, each judged on the sources it never saw; the
    test is over all sources (sign-flip test, Holm across the metrics).

    Each fold is an ordinary run (RUN/fold-k/); a fold chooses (early stopping, best adapter) only on
    tuning sources from its own training side, and without them trains to its last step. The
    folder records every setting: continuing resumes (finished folds are neither trained nor
    scored again), other settings are refused. Prints the pooled verdict, what it is about, and
    the step count at which the folds' pooled held-out loss was lowest (to be confirmed)."""
    from evaluate.crossval import CrossvalJob, crossval
    from shared.synthesis import SamplingSettings
    from train.config import TrainConfig, read_toml

    logging.getLogger("evaluate.crossval").setLevel(logging.INFO)  # which fold is running: a line each
    with user_errors():
        settings = TrainConfig()
        if config:
            settings.updated(read_toml(config), str(config))
        given = {"features": [str(f) for f in features], "profile": profile, "variant": variant,
                 "checkpoint": str(checkpoint) if checkpoint else None, "steps": steps, "batch_size": batch_size,
                 "precision": precision, "device": device}
        settings.updated({key: value for key, value in given.items() if value is not None}, "command line")
        result = crossval(CrossvalJob(settings, run, folds, tuning_fraction, seeds, SamplingSettings(eval_steps, cfg),
                                      _scales(lora_scale), repeats=repeats, overwrite=overwrite))
    trained = result.settings["training"]
    typer.echo(f"{result.variant}, {len(result.clips)} clips of {result.sources} source videos, {result.held_out}; "
               f"each fold trained {trained['steps']} steps (lr {trained['lr']:g}, batch {trained['batch_size']}, "
               f"rank {trained['rank']}, tuning fraction {trained['tuning_fraction']:g}); scored with "
               f"{eval_steps} sampling steps, cfg {cfg:g}, {seeds} seed(s):")
    typer.echo(result.table())
    typer.echo(result.verdict())
    typer.echo(f"It rests on {result.basis()}.")
    typer.echo(result.steps_advice())
    typer.echo(f"numbers: {run / 'crossval.json'}; report: {run / 'crossval' / 'index.html'} ({result.seconds:.0f} s)")


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(value) for value in text.split(","))
    except ValueError:
        raise UserError(f"--lora-scale takes numbers separated by commas, not {text!r}") from None


@app.command()
def demo(
    root: Path = typer.Option(Path("data/demo"), help="Where the demo writes its clips, features and run: a new "
                              "or empty folder, or an earlier demo's."),
    steps: int = typer.Option(200, min=1, help="Training steps."),
) -> None:
    """Offline demo: synthetic clips, features, LoRA training and generated audio, with the tiny profile."""
    from mmaudio_lora.demo import COMMERCIAL_SEC, run_demo
    from shared.weights import check_files

    with user_errors():
        result = run_demo(root, steps)
    typer.echo(f"clips:    {result.tsv} ({result.feature_summary.clips} clips, "
               f"{result.feature_summary.padded} padded to the 8 s window)")
    typer.echo(f"features: {result.features}")
    best = result.train_result.best_val_loss
    typer.echo(f"run:      {result.run} ({result.train_result.steps} steps, last training loss "
               f"{result.train_result.last_train_loss:.3f}" + (f", best validation loss {best:.3f})" if best else ")"))
    typer.echo(f"          {result.train_result.validation}; the split: {result.run / 'split.json'}")
    typer.echo(f"adapter:  {result.run / 'adapter'}; curves: {result.run / 'metrics.jsonl'}, "
               f"tensorboard --logdir {result.run / 'tensorboard'}")
    typer.echo(f"audio:    {result.generated[0]} (clip1, generated with the adapter)")
    typer.echo(f"video:    {result.generated[-1]}")
    typer.echo(f"long:     {result.commercial[-1]} (a new {COMMERCIAL_SEC:g} s commercial, voiced by continued "
               "8 s windows)")
    typer.echo("evaluation of the held-out clips:")
    typer.echo(result.evaluation.table())
    typer.echo(result.evaluation.verdict())
    typer.echo(f"It rests on {result.evaluation.basis()}.")
    typer.echo(f"report:   {result.report}")
    if all(status.found for status in check_files()):
        typer.echo("Official weights found: for the real run, put your clips in data/ and run "
                   "`make features` then `make train`.")
    else:
        typer.echo("This used tiny random models. For real fine-tuning: `mmaudio-lora doctor` lists the "
                   "official files to fetch (`mmaudio-lora download`), then `make features` and `make train`.")


@app.command()
def generate(
    run: Optional[Path] = typer.Option(None, help="Training run folder: its final adapter and its base-model settings."),
    adapter: Optional[Path] = typer.Option(None, help="An adapter folder (e.g. RUN/best/adapter or "
                                           "RUN/checkpoints/step-N/adapter)."),
    no_adapter: bool = typer.Option(False, "--no-adapter", help="The base model alone (to compare)."),
    video: list[Path] = typer.Option([], help="Video file or folder of videos (repeat for several)."),
    tsv: Optional[Path] = typer.Option(None, help="Clip list as for `features` (segments and captions)."),
    video_root: Optional[Path] = typer.Option(None, help="Folder the --tsv paths are relative to [default: its folder]."),
    features: Optional[Path] = typer.Option(None, help="Feature folder from `features`: no encoder is loaded."),
    clip_id: list[str] = typer.Option([], "--id", help="With --features: only this clip id (repeat)."),
    out: Path = typer.Option(Path("data/generated"), help="Output folder: <name>.wav and <name>.mp4."),
    prompt: Optional[str] = typer.Option(None, help="Text prompt (replaces captions); alone: text-to-audio."),
    negative_prompt: str = typer.Option("", help="What to steer away from."),
    duration: Optional[float] = typer.Option(None, help="Seconds of audio, from 0.64 to --max-duration (past the "
                                             "8 s window: continued windows) [default: each clip's whole length]."),
    long: str = typer.Option("windows", help="Past the 8 s window: windows (continued windows, each holding its "
                             "overlap with the one before, as long as the picture) or off (trimmed to 8 s)."),
    overlap: Optional[float] = typer.Option(None, help="Seconds each window shares with the one before: a whole "
                                            "number of latent frames (32 ms at 16k, 23.2 ms at 44k), 0.64 s to half "
                                            "the window [default: 2 s rounded to frames: 1.984 s at 16k, 1.997 s "
                                            "at 44k]."),
    max_duration: float = typer.Option(600.0, help="The longest track made; longer videos and --duration are "
                                       "refused."),
    steps: int = typer.Option(25, min=1, help="Euler steps."),
    cfg: float = typer.Option(4.5, min=0.0, help="Classifier-free guidance strength."),
    seed: int = typer.Option(42, help="Noise seed (the same noise for every clip)."),
    lora_scale: float = typer.Option(1.0, help="Blend: 0 is the base model, 1 the adapter as trained."),
    profile: Optional[str] = typer.Option(None, help="real or tiny [default: the run's, else real]."),
    checkpoint: Optional[Path] = typer.Option(None, help="Base network file [default: the run's, else the "
                                              "variant's official file in the weights folder]."),
    variant: Optional[str] = typer.Option(None, help=VARIANT_HELP + " [default: the run's, else large_44k_v2]"),
    batch_size: int = typer.Option(4, min=1, help="Clips sampled together."),
    device: str = typer.Option("auto", help="auto (CUDA when usable), cpu or cuda."),
    precision: str = typer.Option("auto", help="The network and the video/text encoders: " + PRECISION_HELP),
    mp4: bool = typer.Option(True, help="Also write an mp4 with the source picture (video inputs)."),
    weights_dir: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
) -> None:
    """Generate audio for videos, a clip list, precomputed features or a prompt, with or without an adapter."""
    from generate.long import LongSettings
    from generate.model import resolve_source
    from generate.run import GenerateJob, generate as run_generation
    from shared.synthesis import SamplingSettings

    if sum([run is not None, adapter is not None, no_adapter]) != 1:
        raise typer.BadParameter("give exactly one of --run, --adapter or --no-adapter", param_hint="--run")
    with user_errors():
        source = resolve_source(run, adapter, profile, checkpoint, variant, weights_dir, device, precision)
        job = GenerateJob(out=out, source=source, videos=video, tsv=tsv, video_root=video_root, features=features,
                          ids=clip_id, prompt=prompt, negative_prompt=negative_prompt, duration=duration,
                          sampling=SamplingSettings(steps, cfg, seed), lora_scale=lora_scale,
                          batch_size=batch_size, write_video=mp4,
                          long=LongSettings(long, overlap, max_duration))
        summary = run_generation(job)
    for line in summary.skipped:
        typer.echo(f"skipped {line}")
    model = "base model" if no_adapter else f"adapter {source.adapter} (scale {lora_scale:g})"
    typer.echo(f"{len(summary.written)} file(s) in {summary.out} from {summary.variant} + {model}, "
               f"{summary.seconds:.1f} s")
    for path in summary.written[:10]:
        typer.echo(f"  {path}")
    if summary.replaced:
        typer.echo(f"replaced {len(summary.replaced)} earlier file(s) of the same name in {summary.out}, e.g. "
                   f"{summary.replaced[0].name}")
    if not summary.written:
        raise typer.Exit(1)


@app.command()
def evaluate(
    run: Path = typer.Option(..., help="Training run folder (its adapter/, config.json and split.json)."),
    features: Optional[Path] = typer.Option(None, help="Held-out feature folder [default: the run's recorded "
                                            "validation clips, whole source videos it never trained on]."),
    clip_id: list[str] = typer.Option([], "--id", help="Only this held-out clip id (repeat)."),
    out: Optional[Path] = typer.Option(None, help="JSON report [default: RUN/evaluation.json]."),
    steps: int = typer.Option(25, min=1, help="Euler steps for the generated audio."),
    cfg: float = typer.Option(4.5, min=0.0, help="Classifier-free guidance strength."),
    seed: int = typer.Option(42, help="First noise seed (the same for both models)."),
    seeds: int = typer.Option(3, min=1, help="Seeds per clip and model (seed, seed+1, ...): the per-clip "
                              "differences are averaged over them."),
    lora_scale: str = typer.Option("1", help="Adapter strength, or several separated by commas (0,0.5,1,1.5): the "
                                   "verdict is for 1 when listed (else the first); the others are scored on the same "
                                   "clips as an exploration, each with its own interval."),
    checkpoints: bool = typer.Option(False, "--checkpoints", help="Also score every kept checkpoint's adapter and "
                                     "the best one (validation flow loss only, cheap)."),
    batch_size: int = typer.Option(4, min=1, help="Clips per batch."),
    device: str = typer.Option("auto", help="auto (CUDA when usable), cpu or cuda."),
    precision: str = typer.Option("auto", help="The network: " + PRECISION_HELP),
    profile: Optional[str] = typer.Option(None, help="real or tiny [default: the run's]."),
    checkpoint: Optional[Path] = typer.Option(None, help="Base network file [default: the run's]."),
    weights_dir: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    allow_trained: bool = typer.Option(False, "--allow-trained", help="With --features: score clips (or sources) the "
                                       "adapter trained on, knowingly (refused otherwise: they are not held out)."),
    long: bool = typer.Option(False, "--long", help="Judge long audio: voice the run's held-out commercials whole "
                              "(base and fine-tune, continued windows) and score DeSync and KL_PaSST per window and "
                              "the seams at the joins; needs --tsv with an original_video column and the files."),
    tsv: Optional[Path] = typer.Option(None, help="With --long: the clip list the features were made from."),
    video_root: Optional[Path] = typer.Option(None, help="With --long: the folder the list's paths are relative to "
                                              "[default: the list's folder]."),
    originals: Optional[Path] = typer.Option(None, help="With --long: the folder holding the original_video files "
                                             "[default: the video root]."),
) -> None:
    """Compare the base model with the fine-tuned one on held-out clips: validation flow loss,
    log-mel L1, DeSync and KL_PaSST, tested over source videos (a sign-flip test, Holm across the
    metrics; 'too few sources' below 6).

    Writes RUN/evaluation.json (or --out) and a report beside it to open in a browser,
    RUN/evaluation/index.html (audio, spectrograms, training curves, the verdict)."""
    from evaluate.held_out import evaluate as run_evaluation
    from generate.model import resolve_source
    from evaluate.report import report_folder
    from shared.synthesis import SamplingSettings

    if long:
        _evaluate_long(run, tsv, video_root, originals, out, (steps, cfg, seed), seeds, lora_scale,
                       resolve_source, (profile, checkpoint, weights_dir, device, precision))
        return
    with user_errors():
        scales = _scales(lora_scale)
        source = resolve_source(run=run, profile=profile, checkpoint=checkpoint, weights_dir=weights_dir,
                                device=device, precision=precision)
        result = run_evaluation(run, source, features, clip_id, SamplingSettings(steps, cfg, seed), scales,
                                batch_size, out, checkpoints, seeds=seeds, allow_trained=allow_trained)
    typer.echo(f"{result.variant}, {len(result.clips)} held-out clip(s) ({result.held_out}), "
               f"{steps} sampling steps, cfg {cfg:g}, seeds {seed}-{seed + seeds - 1}:")
    typer.echo(result.table())
    typer.echo(result.verdict())
    typer.echo(f"It rests on {result.basis()}.")
    numbers = out or run / "evaluation.json"
    typer.echo(f"numbers: {numbers}; report: {report_folder(numbers) / 'index.html'} "
               f"({result.seconds:.0f} s)")


def _evaluate_long(run: Path, tsv: Optional[Path], video_root: Optional[Path], originals: Optional[Path],
                   out: Optional[Path], sampling: tuple, seeds: int, lora_scale: str, resolve_source,
                   model: tuple) -> None:
    from evaluate.long_form import evaluate_long
    from shared.run_record import LONG_EVALUATION_FILE
    from shared.synthesis import SamplingSettings

    with user_errors():
        sampling = SamplingSettings(*sampling)
        if tsv is None:
            raise UserError("evaluate --long needs --tsv: the clip list with the original_video column")
        root = video_root or tsv.parent
        profile, checkpoint, weights_dir, device, precision = model
        source = resolve_source(run=run, profile=profile, checkpoint=checkpoint, weights_dir=weights_dir,
                                device=device, precision=precision)
        result = evaluate_long(run, tsv, root, originals or root, out or run / LONG_EVALUATION_FILE, sampling,
                               seeds, _scales(lora_scale)[0], source=source)
    typer.echo(f"{result.variant}, {len(result.tracks)} held-out commercial(s) voiced whole, "
               f"{sampling.steps} sampling steps, cfg {sampling.cfg_strength:g}, {seeds} seed(s):")
    typer.echo(result.table())
    typer.echo(result.verdict())
    numbers = out or run / LONG_EVALUATION_FILE
    typer.echo(f"numbers: {numbers}; audio: {numbers.with_suffix('')} ({result.seconds:.0f} s)")


@app.command()
def export(
    run: Path = typer.Option(..., help="Training run folder (its adapter/ and config.json)."),
    out: Path = typer.Option(..., help="Merged checkpoint to write (.pth); a .safetensors copy goes beside it. "
                             "Keep the variant in the name (merged_large_44k_v2.pth): some tools read the rate from it."),
    dtype: str = typer.Option("fp32", help="fp32 (the official files' precision), fp16 or bf16 (half the size; "
                              "the latent statistics stay float32)."),
    profile: Optional[str] = typer.Option(None, help="real or tiny [default: the run's]."),
    checkpoint: Optional[Path] = typer.Option(None, help="Base network file [default: the run's]."),
) -> None:
    """Merge the LoRA adapter into the base network: a checkpoint in the official layout.

    Load it with MMAudio's own code or ComfyUI-MMAudio; see the README's "Using the fine-tune
    elsewhere" (do not put it in place of the official file: MMAudio's demo re-downloads it)."""
    from generate.export import check_dtype, export_checkpoint, name_warning
    from generate.model import resolve_source

    with user_errors():
        check_dtype(dtype)
        result = export_checkpoint(run, out, resolve_source(run=run, profile=profile, checkpoint=checkpoint), dtype)
    typer.echo(f"{result.pth} and {result.safetensors}: {result.variant}, {result.tensors} tensors in {result.dtype}, "
               "no LoRA left (load with MMAudio's own loader, strict)")
    warning = name_warning(result.pth, result.variant)
    if warning:
        typer.echo(f"warning: {warning}")
