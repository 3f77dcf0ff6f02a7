"""What a run shows while it trains: a metrics log (CSV or TensorBoard) and sample images.

Both run on the main process only. The sampling hook is a plain function so the loop does not
depend on how images are generated; the default one renders fixed prompts with ``ldm.Pipeline``
and a fixed seed, so samples of successive steps are comparable.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.errors import ConfigError
from ldm.io import atomic_write
from ldm.settings import GenerationDefaults

LOG_FIELDS = ("step", "epoch", "loss", "lr", "images_per_second", "elapsed_seconds")


class MetricsLog:
    """Append-only ``log.csv`` (rows survive a kill: each is flushed) or a TensorBoard event folder."""

    def __init__(self, output_dir: Path, log_format: str, first_step: int = 0):
        """``first_step``: the step a resumed run starts from. What the interrupted run logged after
        it is logged again by the resumed run, so it is dropped: CSV rows are removed, and TensorBoard
        gets a purge marker at ``first_step + 1`` (its reader then hides the older events of those
        steps; TensorBoard event files are append-only), so every step appears once."""
        self.log_format = log_format
        self.writer: Any = None
        if log_format == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--log tensorboard needs the tensorboard package; pip install tensorboard, or use --log csv") from None
            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=first_step + 1 if first_step else None)
            return
        path = output_dir / "log.csv"
        kept = []
        if path.exists():
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= first_step]
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: _write_rows(tmp, kept), overwrite=True)
        self.file = open(path, "a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)

    def write(self, row: dict) -> None:
        if self.writer is not None:
            for name in LOG_FIELDS[2:]:
                self.writer.add_scalar(f"train/{name}", row[name], row["step"])
            return
        self.csv.writerow(row)
        self.file.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        else:
            self.file.close()


def _write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class SampleRequest:
    """Everything the sampling hook needs: the current models and what to render."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: Any
    prompts: tuple[str, ...]
    step: int
    seed: int
    num_inference_steps: int | None  # None: the model's recommendation (defaults)
    guidance_scale: float | None  # None: the model's recommendation (defaults)
    size: tuple[int, int]  # (width, height)
    folder: Path
    defaults: GenerationDefaults = GenerationDefaults()  # the model's generation_config.json, as txt2img uses it
    text_encoder_2: Any = None  # SDXL's second text encoder and tokenizer; None for SD 1.x / 2.x
    tokenizer_2: Any = None


def save_samples(request: SampleRequest) -> list[Path]:
    """Render each prompt with ``ldm.Pipeline`` and write ``samples/step-<N>-<i>.png``."""
    from ldm.pipeline import Pipeline

    pipeline = Pipeline(
        request.unet, request.vae, request.text_encoder, request.tokenizer, request.scheduler_config,
        text_encoder_2=request.text_encoder_2, tokenizer_2=request.tokenizer_2,
    )
    pipeline.defaults = request.defaults
    written = []
    for number, prompt in enumerate(request.prompts):
        result = pipeline(
            prompt,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            width=request.size[0],
            height=request.size[1],
            seed=request.seed + number,
        )
        image = result.images[0]
        path = request.folder / f"step-{request.step:06d}-{number}.png"
        # A resumed run re-renders the same step identically, so replacing is safe.
        written.append(atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"), overwrite=True))
    return written
