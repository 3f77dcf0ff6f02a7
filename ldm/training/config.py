"""Typed settings of a training run: the data (``DataConfig``) and the loop (``TrainConfig``).

Both are frozen dataclasses that serialize to JSON (``to_dict`` / ``from_dict``),
so a checkpoint records exactly what produced it and ``--resume`` can refuse a
run whose settings changed in a way that would break the continuation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ldm.errors import ConfigError

SmallImages = Literal["upscale", "skip"]
Crop = Literal["center", "random"]
LrSchedule = Literal["constant", "linear", "cosine"]
MixedPrecision = Literal["no", "fp16", "bf16"]
LogFormat = Literal["csv", "tensorboard"]


@dataclass(frozen=True)
class DataConfig:
    resolution: int = 512  # pixels; the area of every training image is about resolution**2
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
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError(f"--resolution {self.resolution} is not a positive multiple of 8; use e.g. 512")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"--caption-dropout {self.caption_dropout} is outside [0, 1]")
        if self.cache_latents and self.crop == "random":
            raise ConfigError("--cache-latents needs a fixed crop; use --crop center or drop --cache-latents")


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
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30 % slower
    ema_decay: float | None = None  # keep an exponential moving average of the trained weights
    mixed_precision: MixedPrecision = "no"  # fp16 / bf16 autocast through accelerate (CUDA)
    seed: int = 0  # the same seed, data and settings give the same weights, also across --resume
    train_text_encoder: bool = False
    lora_rank: int | None = None  # train LoRA adapters of this rank instead of the full weights
    lora_alpha: float | None = None  # LoRA scale numerator (default: the rank, i.e. scale 1)
    text_encoder_learning_rate: float | None = None  # default: learning_rate
    checkpointing_steps: int | None = None  # write the full training state every N steps
    checkpoints_total_limit: int | None = None  # keep only the newest K checkpoints
    sample_every: int | None = None  # generate sample images every N steps
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20  # sampler steps of those images
    sample_guidance_scale: float = 7.5
    log_every: int = 1  # write a log row every N steps
    log_format: LogFormat = "csv"
    num_workers: int = 0  # data-loading worker processes

    def __post_init__(self):
        positive = {
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "log_every": self.log_every,
            "sample_steps": self.sample_steps,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        optional_positive = {
            "checkpointing_steps": self.checkpointing_steps,
            "checkpoints_total_limit": self.checkpoints_total_limit,
            "sample_every": self.sample_every,
            "lora_rank": self.lora_rank,
        }
        for name, value in optional_positive.items():
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 (or unset), got {value}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.learning_rate}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"lr warm-up steps must be >= 0, got {self.lr_warmup_steps}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"EMA decay must be in (0, 1), got {self.ema_decay}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ConfigError(f"Min-SNR gamma must be positive, got {self.min_snr_gamma}")
        if self.noise_offset < 0:
            raise ConfigError(f"noise offset must be >= 0, got {self.noise_offset}")
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ConfigError("--lora-alpha needs --lora-rank")
        if self.sample_every is not None and not self.sample_prompts:
            raise ConfigError("sampling every N steps needs at least one --sample-prompt")

    @property
    def lora(self) -> bool:
        return self.lora_rank is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return cls(**{**values, "sample_prompts": tuple(values.get("sample_prompts", ()))})
