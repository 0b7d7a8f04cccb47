"""Commands that make weights and data: train, scenes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import UserError
from ..io import check_output_file, check_output_folder, check_outputs
from ..train.settings import TrainSettings  # its defaults are the train command's
from .app import app
from .console import console_for, counted_progress


def train_with_progress(preset, settings, out: str, log_path: str, console: Console) -> dict:
    """training's train() with a progress bar showing running means of loss and IoU; returns its record."""
    from ..train.loop import train as run_training

    bar, task = counted_progress(console, settings.steps, "train", stats=True)
    recent: list[dict] = []

    def progress(step: int, record: dict) -> None:
        recent.append(record)
        del recent[:-50]  # running means over the last 50 steps: single batches are noisy
        mean = lambda k: sum(r[k] for r in recent) / len(recent)  # noqa: E731
        bar.update(task, advance=1, stats=f"loss {mean('loss'):.3f} iou {mean('iou'):.3f}")

    with bar:
        return run_training(preset, settings, out, log_path, progress)


@app.command()
def train(
    out: str = typer.Option(..., "--out", "-o", help="Checkpoint to write (ois-deploy safetensors)."),
    steps: int = typer.Option(..., "--steps", min=1, help="Optimiser steps (one batch of fresh scenes each)."),
    preset: str = typer.Option("ois-tiny", "--preset", "-p", help="Model to train from scratch (ois-tiny fits a CPU)."),
    seed: int = typer.Option(TrainSettings.seed, "--seed", help="Seeds the init and every generated scene and click."),
    batch_size: int = typer.Option(TrainSettings.batch_size, "--batch-size", min=1, help="Scenes per step."),
    objects_per_scene: int = typer.Option(TrainSettings.objects_per_scene, "--objects-per-scene", min=1,
                                          help="Objects prompted per scene (one encoder pass)."),
    lr: float = typer.Option(TrainSettings.lr, "--lr", help="Peak learning rate (AdamW, warm-up then cosine)."),
    max_extra_clicks: int = typer.Option(TrainSettings.max_extra_clicks, "--max-extra-clicks", min=0,
                                         help="Most simulated corrective clicks (no gradient) before the trained one."),
    order_attention: str = typer.Option(TrainSettings.order_attention, "--order-attention",
                                        help="bias (OIS) or off (trains the ablation)."),
    log: Optional[str] = typer.Option(None, "--log", help="Loss log, JSON lines (default: OUT + .log.jsonl)."),
):
    """Train OIS on generated depth-ordered scenes (RITM/SegNext iterative protocol, mask and
    depth losses); writes the checkpoint and a loss log."""
    from ..presets import ORDER_ATTENTION_MODES, get_preset

    get_preset(preset)
    if not out.strip():
        raise UserError("--out: the output path is empty")
    if order_attention not in ORDER_ATTENTION_MODES:
        raise UserError(f"--order-attention must be one of {', '.join(ORDER_ATTENTION_MODES)}")
    settings = TrainSettings(
        steps=steps, seed=seed, batch_size=batch_size, objects_per_scene=objects_per_scene, lr=lr,
        max_extra_clicks=max_extra_clicks, order_attention=order_attention,
    )
    log_path = log or out + ".log.jsonl"
    check_outputs(out, log_path)
    check_output_file(out, "--out")
    check_output_file(log_path, "--log")
    console = console_for(None, stderr=True)
    summary = train_with_progress(preset, settings, out, log_path, console)
    console.print(f"wrote {out} and {log_path} ({summary['seconds']:.0f} s, {steps} steps, seed {seed})")


@app.command()
def scenes(
    out: str = typer.Option(..., "--out", "-o", help="New folder for the dataset (DAVIS layout: img/ + gt/)."),
    count: int = typer.Option(100, "--count", min=1, help="Scenes to generate (one sample per visible object)."),
    seed: int = typer.Option(0, "--seed", help="Held-out stream seed: never seen in training."),
):
    """Write held-out generated scenes as an evaluation set in the DAVIS layout."""
    from ..io import staging_dir_beside
    from ..train.scenes import write_davis

    if out.strip() and Path(out).exists():
        raise UserError(f"{out} already exists: give a new folder")
    target = check_output_folder(out, "--out")
    staging = staging_dir_beside(target)  # nothing half-written
    try:
        console = console_for(None, stderr=True)
        bar, task = counted_progress(console, count, "scenes")
        with bar:
            written = write_davis(staging, count, seed, progress=lambda: bar.advance(task))
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    console.print(f"wrote {written} objects from {count} scenes to {target}")
