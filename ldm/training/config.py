"""Typed settings of a training run: the data (``DataConfig``) and the loop (``TrainConfig``).

Both are frozen dataclasses that serialize to JSON (``to_dict`` / ``from_dict``),
so a checkpoint records exactly what produced it and ``--resume`` can refuse a
run whose settings changed in a way that would break the continuation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from ldm import checks
from ldm.errors import SettingError
from ldm.prompts import check_prompt

SmallImages = Literal["upscale", "skip"]
Crop = Literal["center", "random"]
LrSchedule = Literal["constant", "linear", "cosine"]
MixedPrecision = Literal["no", "fp16", "bf16"]
LogFormat = Literal["csv", "tensorboard"]


def check_int(name: str, value: int | None, low: int) -> None:
    """``value`` (None: unset, allowed) is at least ``low``."""
    if value is not None and value < low:
        raise SettingError(f"{{{name}}} must be at least {low}, got {value}")


def check_float(
    name: str, value: float | None, low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False
) -> None:
    """``value`` (None: unset, allowed) is a finite number between ``low`` and ``high``.

    nan compares False with everything, so it would pass a plain range check: finiteness comes first.
    """
    if value is None:
        return
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (math.isfinite(value) and above and below):
        raise SettingError(f"{{{name}}} must be a finite number {_interval(low, high, open_low, open_high)}, got {value}")


def _interval(low: float, high: float, open_low: bool, open_high: bool) -> str:
    if math.isinf(high):
        return f"{'above' if open_low else 'at least'} {low:g}"
    return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"


@dataclass(frozen=True)
class DataConfig:
    resolution: int | None = 512  # pixels; every training image has about resolution**2 (None: not chosen yet)
    crop: Crop = "center"  # where the crop to the (bucket) size is taken
    random_flip: bool = False  # mirror left-right with probability 1/2
    buckets: bool = True  # aspect-ratio buckets keep non-square images whole instead of cropping them square
    small_images: SmallImages = "upscale"  # an image smaller than its target size is upscaled or skipped
    caption_dropout: float = 0.0  # probability of training on the empty caption (keeps classifier-free guidance working)
    allow_empty_captions: bool = False  # an image without a caption trains on "" instead of being an error
    caption_column: str = "text"  # the caption field of metadata.jsonl
    cache_latents: bool = False  # encode each image with the VAE once and reuse the latent distribution
    cache_text_embeddings: bool = False  # encode each caption once (only with a frozen text encoder)

    def __post_init__(self):
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise SettingError(f"{{resolution}} must be a positive multiple of 8 (e.g. 512), got {self.resolution}")
        check_float("caption_dropout", self.caption_dropout, 0.0, 1.0)
        if self.cache_latents and self.crop == "random":
            raise SettingError("{cache_latents} needs a fixed crop; use {crop} center or drop {cache_latents}")


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000  # optimizer steps (each one sees batch_size * accumulation * processes images)
    batch_size: int = 1  # images per process per forward pass
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_schedule: LrSchedule = "constant"  # after the warm-up
    lr_warmup_steps: int = 0  # linear ramp from 0 to learning_rate
    max_grad_norm: float | None = 1.0  # gradient clipping; None disables it
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's choice
    noise_offset: float = 0.0  # per-channel constant added to the noise (Guttenberg 2023); ~0.05-0.1
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, one more forward pass of compute
    ema_decay: float | None = None  # keep an exponential moving average of the trained weights
    mixed_precision: MixedPrecision = "no"  # fp16 / bf16 autocast through accelerate (CUDA)
    seed: int = 0  # the same seed, data and settings give the same weights, also across --resume
    train_text_encoder: bool = False
    lora_rank: int | None = None  # train LoRA adapters of this rank instead of the full weights
    lora_alpha: float | None = None  # LoRA scale numerator (default: the rank, i.e. scale 1)
    text_encoder_learning_rate: float | None = None  # default: learning_rate
    # A checkpoint every N steps and at the last one (None: none): a killed run loses at most N steps
    # (minutes on a GPU), and a finished run's final state is what a longer run continues from.
    checkpointing_steps: int | None = 500
    checkpoints_total_limit: int | None = 3  # keep only the newest K (None: all); see checkpoint.save_checkpoint
    sample_every: int | None = None  # generate sample images every N steps
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int | None = None  # steps of those images (None: the model's recommendation, as txt2img)
    sample_guidance_scale: float | None = None  # None: the model's recommendation, as txt2img
    log_every: int = 1  # write a log row every N steps
    log_format: LogFormat = "csv"
    num_workers: int = 0  # data-loading worker processes

    def __post_init__(self):
        at_least_one = (
            "max_steps", "batch_size", "gradient_accumulation_steps", "log_every",
            "checkpointing_steps", "checkpoints_total_limit", "sample_every", "lora_rank", "sample_steps",
        )
        for name in at_least_one:
            check_int(name, getattr(self, name), 1)
        check_int("lr_warmup_steps", self.lr_warmup_steps, 0)
        check_int("num_workers", self.num_workers, 0)
        self.check_floats()
        if self.lora_alpha is not None and self.lora_rank is None:
            raise SettingError("{lora_alpha} needs {lora_rank}")
        if self.sample_every is not None and not self.sample_prompts:
            raise SettingError("sampling every N steps ({sample_every}) needs at least one {sample_prompts}")
        self.check_samples()

    def check_samples(self) -> None:
        """The sample images' settings, checked now: found when the first sample renders, a wrong one
        would end the run after a step's work that no checkpoint kept."""
        if self.sample_steps is not None and self.sample_steps > checks.MAX_STEPS:
            raise SettingError(f"{{sample_steps}} must be from 1 to {checks.MAX_STEPS}, got {self.sample_steps}")
        for prompt in self.sample_prompts:
            check_prompt(prompt, "sample_prompts")

    def check_floats(self) -> None:
        """Every float is finite and in its range (a nan learning rate would train silently into nan weights)."""
        for name in ("learning_rate", "text_encoder_learning_rate", "adam_epsilon", "min_snr_gamma", "max_grad_norm", "lora_alpha"):
            check_float(name, getattr(self, name), 0.0, open_low=True)
        for name in ("adam_beta1", "adam_beta2"):
            check_float(name, getattr(self, name), 0.0, 1.0, open_high=True)
        check_float("ema_decay", self.ema_decay, 0.0, 1.0, open_low=True, open_high=True)
        for name in ("weight_decay", "noise_offset"):
            check_float(name, getattr(self, name), 0.0)
        if self.sample_guidance_scale is not None:  # as txt2img's: any finite scale, <= 1 turns guidance off
            checks.check_guidance_scale(self.sample_guidance_scale, "sample_guidance_scale")

    @property
    def lora(self) -> bool:
        return self.lora_rank is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return cls(**{**values, "sample_prompts": tuple(values.get("sample_prompts", ()))})
