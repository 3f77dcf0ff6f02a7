"""The loaded model and how a job runs on it: batches, step callbacks, stopping, saving.

The engine holds one ``Pipeline``, loaded once and kept (``weights_after_use="keep"``). A job runs
its batches with ``Pipeline.generate`` holding ``lock``; switching the model takes the same lock,
so a running job finishes on the model it started with. A job's ``<lora:...>`` tags make its LoRAs
the pipeline's tag-loaded adapters for its batches (``Pipeline.set_prompt_loras``); the next job's
tags, or their absence, replace them, so each image and infotext has its own job's LoRAs. Stopping: the step callback raises
``StopSampling`` when the job is flagged; as A1111 does on an interrupt, the batch's images are then
made from the last step's denoised latents (its x_0 estimate) as the finished ones would be (an inpainting's
known region put back and pasted over the init image: ``stages.partial_output``) and kept, unless the job
was cancelled. A job's refiner (``refiner_checkpoint``) is loaded on first use and kept, one at a time:
naming another releases it (``hold_one_refiner``).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from ldm.images import save_png
from ldm.pipeline import Pipeline
from ldm.pipeline.inpaint import takes_mask
from ldm.pipeline.sdxl import is_sdxl
from ldm.pipeline.stages import Stopped, resolve
from ldm.previews import preview
from ldm.server.catalog import ModelEntry
from ldm.server.jobs import Job, JobRequest
from ldm.settings import GenerationSettings


class StopSampling(Stopped):
    """Raised by the step callback of a job that was interrupted, skipped or cancelled."""


def default_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """``device`` or CUDA when there is one, else the CPU; ``dtype`` or fp16 on CUDA, fp32 elsewhere."""
    chosen = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = dtype or ("fp16" if chosen.type == "cuda" else "fp32")
    return chosen, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


class Engine:
    """One loaded model and the lock that makes generations and model switches take turns."""

    def __init__(
        self, model: ModelEntry, max_pixels: int, outputs: Path | None, device: str | None = None, dtype: str | None = None,
        loras_dir: Path | None = None,
        embeddings: Path | None = None,
    ):  # fmt: skip
        self.max_pixels = max_pixels
        self.outputs = outputs
        self.loras_dir = loras_dir  # where the prompts' <lora:...> tags find their files
        self.embeddings = embeddings  # every model loaded reads the embeddings of this folder that fit it
        self.device, self.dtype = default_device(device, dtype)
        self.lock = threading.Lock()
        self.model = model
        self.pipeline = self._load(model)
        self.clip_skip: int | None = None  # A1111's CLIP_stop_at_last_layers - 1, for requests that give none

    def _load(self, model: ModelEntry) -> Pipeline:
        pipe = Pipeline.from_pretrained(model.path, device=self.device, dtype=self.dtype)
        # Made here, once, not lazily by the first request's thread: GET /sdapi/v1/embeddings reads it without
        # the lock, and nothing changes it after this load.
        embeddings = pipe.embeddings
        if self.embeddings is not None:
            with warnings.catch_warnings():  # the files that do not fit are listed by GET /sdapi/v1/embeddings
                warnings.simplefilter("ignore")
                embeddings.load(self.embeddings)
        return pipe.configure(max_pixels=self.max_pixels, weights_after_use="keep", loras_dir=self.loras_dir)

    def switch(self, model: ModelEntry) -> None:
        """Load ``model`` and serve it from now on; waits for the running job, which keeps its model."""
        with self.lock:
            if model.path.resolve() != self.model.path.resolve():
                pipeline = self._load(model)  # a model that fails to load leaves the old one serving
                self.pipeline, self.model = pipeline, model

    def _pipeline_for(self, request: JobRequest) -> Pipeline:
        """The pipeline a job runs on (lock held): the loaded one, or the model its request names.

        As in A1111, a request's own model is loaded for it and, unless ``restore_model`` is false,
        the loaded model serves the next job; otherwise the request's model stays loaded.
        """
        model = request.model
        if model is None or model.path.resolve() == self.model.path.resolve():
            return self.pipeline
        pipe = self._load(model)
        if not request.restore_model:
            self.pipeline, self.model = pipe, model
        return pipe

    def run(self, job: Job) -> None:
        """Every batch of ``job``, in order; stops early when the job is flagged."""
        with self.lock:
            pipe = self._pipeline_for(job.request)
            request = job.request
            hold_one_refiner(pipe, request.settings.refiner)
            job.changed(inpainting_conditioning=takes_mask(pipe))  # A1111's is_using_inpainting_conditioning
            for k in range(request.n_iter):
                if job.interrupted or job.cancelled:
                    break
                settings = a1111_clip_skip(pipe, request.settings.from_image(k * request.settings.batch))  # batch k continues k - 1
                job.changed(batch=k, step=0, skipped=False)
                images, parameters = self._batch(pipe, settings, job)
                saved = [save_png(image, self.outputs, p) for image, p in zip(images, parameters)] if request.save else []
                job.changed(images=job.images + images, parameters=job.parameters + parameters, saved=job.saved + saved)

    def _batch(self, pipe: Pipeline, settings: GenerationSettings, job: Job):
        """One batch's images and their parameters (those made so far if the job is stopped)."""
        resolved = resolve(pipe, settings, None, None, None).resolved  # checked against the model; its step count
        filled = resolved.settings
        job.changed(steps=filled.total_steps)  # the hires pass's steps included

        def after_step(i, t, latents, denoised) -> None:
            job.changed(step=i + 1, preview=preview(pipe.vae, denoised))
            if job.stop_requested:
                raise StopSampling

        try:
            result = pipe.generate(settings, callback=after_step)
            return result.images, result.settings.parameters()
        except StopSampling as stop:
            if job.cancelled:
                return [], []
            return stop.partial("pil"), resolved.parameters()


def hold_one_refiner(pipe: Pipeline, refiner: str | Path | None) -> None:
    """At most one refiner stays loaded, as one model does: a job naming another releases the last one before its
    own is read (peak memory: the base and one refiner); a job naming none leaves the last one for the next."""
    if refiner is None:
        return
    for name in list(pipe.refiners.named):
        if name != str(refiner):
            pipe.unload_refiner(name)


def a1111_clip_skip(pipe: Pipeline, settings: GenerationSettings) -> GenerationSettings:
    """A1111 applies "Clip skip" (``CLIP_stop_at_last_layers``) to SD 1.x/2.x alone: on SDXL, with its option
    ``sdxl_clip_l_skip`` off (the default), CLIP ViT-L reads its penultimate layer and bigG its penultimate one whatever
    it says (``modules/sd_hijack_clip.py`` ``FrozenCLIPEmbedderForSDXLWithCustomWords``, ``sd_hijack_open_clip.py``).
    The server answers A1111's API as A1111 does; Python and the command line keep diffusers' clip skip on both."""
    return replace(settings, clip_skip=None) if settings.clip_skip and is_sdxl(pipe) else settings
