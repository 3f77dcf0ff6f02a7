"""How a loaded pipeline runs: device, dtype, attention kernel, offload, residency, decoding, limits.

Set once per pipeline (``Pipeline.configure``) and the same for every call; what changes per call is
a ``GenerationSettings``. These two are the only ways to configure ldm.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import torch

from ldm import checks
from ldm.errors import ConfigError
from ldm.kernels.choice import KernelChoice, kernel_choice
from ldm.models import AttentionBackend
from ldm.residency import Residency, WeightsAfterUse

DecodeMode = Literal["full", "sliced", "tiled"]


class MemoryFormats(NamedTuple):
    """The memory format each network runs in (ControlNets: the U-Net's)."""

    unet: torch.memory_format
    vae: torch.memory_format


@dataclass(frozen=True)
class PipelineSetup:
    """A pipeline's set-up; ``Pipeline.configure(**changes)`` applies a change to the networks."""

    device: torch.device = torch.device("cpu")  # where the networks run
    dtype: torch.dtype = torch.float32  # of the networks' weights; the scheduler's arithmetic stays fp32
    attention: AttentionBackend = "sdpa"  # "sliced" bounds memory by attention_slice_size heads at a time
    attention_slice_size: int | None = None
    cpu_offload: bool = False  # keep the networks on the CPU, each on ``device`` only while it runs
    # After each network's last stage in a call: "page-out" hands its memory-mapped weights back to the
    # page cache, "keep" leaves them resident, "release" frees them (one-shot calls; ldm.residency).
    weights_after_use: WeightsAfterUse = "page-out"
    decode_mode: DecodeMode = "full"  # the VAE's: "sliced": one image at a time; "tiled": overlapping tiles
    # The U-Net's and VAE's weights and activations in NHWC; None: each network where the fast paths measured it
    # faster (KernelChoice.unet_channels_last, vae_channels_last: bf16 on some CPUs), else not (docs/performance.md).
    channels_last: bool | None = None
    kernels: KernelChoice | None = None  # the CPU fast paths and layouts; None: measured for this CPU (ldm.kernels.choice)
    max_pixels: int = checks.MAX_PIXELS  # largest batch a call may make: width x height x images
    loras_dir: Path | None = None  # where the prompt's <lora:NAME:WEIGHT> tags find their files (subfolders too)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        check_dtype(self.dtype, self.device)
        for name, choices in (
            ("attention", get_args(AttentionBackend)),
            ("weights_after_use", get_args(WeightsAfterUse)),
            ("decode_mode", get_args(DecodeMode)),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        checks.check_max_pixels(self.max_pixels)
        if self.loras_dir is not None:
            object.__setattr__(self, "loras_dir", Path(self.loras_dir))
            if not self.loras_dir.is_dir():
                raise ConfigError(f"loras_dir {self.loras_dir} is not a folder")

    @property
    def residency(self) -> Residency:
        return Residency(self.device, torch.device("cpu") if self.cpu_offload else None, self.weights_after_use)

    def memory_formats(self, kernels: KernelChoice) -> MemoryFormats:
        """The U-Net's and the VAE's memory formats with the fast paths ``kernels`` (this set-up's ``kernel_choice``,
        which also carries the layouts measured on the CPU; off the CPU, ``channels_last=None`` means NCHW)."""

        def layout(measured: bool) -> torch.memory_format:
            wanted = measured and self.device.type == "cpu" if self.channels_last is None else self.channels_last
            return torch.channels_last if wanted else torch.contiguous_format

        return MemoryFormats(unet=layout(kernels.unet_channels_last), vae=layout(kernels.vae_channels_last))

    @property
    def kernel_choice(self) -> KernelChoice:
        """``kernels``, or the fast paths measured for this CPU and dtype (cached; nothing off the CPU)."""
        return self.kernels if self.kernels is not None else kernel_choice(self.device, self.dtype)

    @classmethod
    def check_names(cls, names) -> None:
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ConfigError(f"unknown pipeline setting(s) {', '.join(unknown)}; the settings are {', '.join(known)}")


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """fp16 is for CUDA: CPU kernels in fp16 are hundreds of times slower and some are missing."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("float16 needs a CUDA device; on the CPU use float32 or bfloat16")
