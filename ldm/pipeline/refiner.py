"""A1111's SDXL "Refiner": the base runs the noisy part of the schedule, the refiner the rest.

diffusers' "ensemble of expert denoisers" (its SDXL docs; Balaji et al. 2022, eDiff-I): the base
stops at ``denoising_end = switch`` of the schedule and hands its latents, still noisy, to the
refiner (``StableDiffusionXLImg2ImgPipeline`` with ``denoising_start = switch``), which neither
noises nor rescales them and runs the timesteps below the switch with its own scheduler config,
its own text encoder (bigG) and its aesthetic-score conditioning. In ldm one call does both:
``pipe(prompt, refiner="refiner.safetensors", refiner_switch=0.8)`` (``ldm txt2img --refiner FILE
--refiner-switch 0.8``), or the two calls of diffusers' recipe with ``SdxlOptions(denoising_end=...)``
and ``SdxlOptions(denoising_start=...)`` and ``latents=``.

The refiner goes on drawing from each image's generator (the seed rule: one stream per image), with
the same prompts (their LoRA tags left out: the tags' LoRAs are the base's), negatives, steps,
sampler and guidance; the base's VAE decodes (both SDXL 1.0 models ship the same VAE).
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ldm.errors import InputError
from ldm.pipeline import stages
from ldm.pipeline import sdxl
from ldm.pipeline.hires import counted_on
from ldm.pipeline.sdxl import is_sdxl
from ldm.pipeline.setup import PipelineSetup
from ldm.prompts import split_lora_tags
from ldm.sdxl import SdxlOptions

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline


class Refiners:
    """The refiners a pipeline has loaded: by name (``load``), or by the path a call names, read on first use."""

    def __init__(self) -> None:
        self.named: dict[str, Pipeline] = {}
        self._paths: dict[Path, str] = {}

    def load(self, base: Pipeline, refiner: str | Path | Pipeline, name: str | None = None) -> str:
        """Keep ``refiner`` (a loaded ``Pipeline``, or a model file or folder, loaded in the base's set-up) and return its name."""
        if isinstance(refiner, (str, Path)):
            from ldm.pipeline.pipeline import Pipeline

            path = Path(refiner)
            refiner = Pipeline.from_pretrained(path, device=base.device, dtype=base.dtype)
            kept = {f.name: getattr(base.setup, f.name) for f in fields(PipelineSetup) if f.name not in ("device", "dtype")}
            refiner.configure(**kept)
        if not is_sdxl(refiner):
            raise InputError(f"the refiner {refiner.name!r} is not an SDXL model; pass an SDXL refiner (or base) model")
        name = name or refiner.name
        self.named[name] = refiner
        return name

    def get(self, base: Pipeline, refiner: str | Path) -> Pipeline:
        """The refiner a call names: a loaded name, else a path, loaded once."""
        if str(refiner) in self.named:
            return self.named[str(refiner)]
        path = Path(refiner)
        if not path.exists():
            loaded = ", ".join(self.named) or "none"
            raise InputError(f"no refiner is loaded as {str(refiner)!r} and no such file or folder exists (loaded: {loaded})")
        if path.resolve() not in self._paths:
            self._paths[path.resolve()] = self.load(base, path, name=str(refiner))
        return self.named[self._paths[path.resolve()]]

    def drop(self, name: str) -> None:
        """Forget a loaded refiner and the path that named it; its memory goes with the last call that used it."""
        if name not in self.named:
            raise InputError(f"no refiner is loaded as {name!r}; loaded: {', '.join(self.named) or 'none'}")
        del self.named[name]
        self._paths = {path: kept for path, kept in self._paths.items() if kept != name}

    def label(self, base: Pipeline, refiner: str | Path) -> str:
        """The refiner as A1111's "Refiner" names it: ``name [hash]`` (the hash of a single file), else ``name``."""
        pipe = self.get(base, refiner)
        return f"{pipe.name} [{pipe.model_hash}]" if pipe.model_hash else pipe.name


def refined(pipe: Pipeline, call: stages.Call, x: torch.Tensor, callback: stages.StepCallback | None) -> torch.Tensor:
    """The call's latents after the refiner's part of the schedule (the latents as they are without a refiner)."""
    s = call.settings
    if s.refiner is None:
        return x
    refiner = pipe.refiners.get(pipe, s.refiner)
    refiner.embeddings.mirror(pipe.embeddings.loaded.values())  # exactly the base's embeddings, their clip_g vectors on its bigG
    settings = replace(
        s, prompt=tuple(split_lora_tags(text)[0] for text in s.prompt), refiner=None, refiner_switch=None, seed=None,
        subseed=None, subseed_strength=0.0, init_image=None, strength=None, sdxl=replace(s.sdxl or SdxlOptions(), denoising_start=s.refiner_switch),
    )  # fmt: skip
    handed = stages.resolve(refiner, settings, None, call.generators, x)
    text = stages.encode_prompts(refiner, handed)
    timesteps = stages.prepare_timesteps(refiner, handed)
    x = stages.initial_latents(refiner, handed, timesteps)
    base_steps = sdxl.steps_before(handed, refiner.scheduler_config.num_train_timesteps)
    return stages.denoise(refiner, handed, x, timesteps, text, counted_on(callback, base_steps))  # one step count
