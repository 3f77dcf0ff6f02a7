"""AUTOMATIC1111's HTTP API (``/sdapi/v1/...``): its paths, field names, defaults and answers.

Each handler translates (``ldm.server.translate``) and calls the server (``ldm.server.service``):
generations go through the same job queue as the native API, one at a time. The routes are bound
methods of one object per app, as A1111's own ``Api`` class registers them; nothing is global.
Lists of things ldm does not have (VAEs, upscalers, scripts, styles) answer an empty list.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool

from ldm import checks
from ldm.errors import LdmError, SettingError
from ldm.server import schema
from ldm.server.controlnet import MODULES, controlnet_models
from ldm.server.jobs import Job, JobCrashed
from ldm.server.names import SCHEDULE_TYPES, samplers
from ldm.server.service import Server
from ldm.server.translate import info_json, job_request, open_base64_image, png_base64, png_bytes, png_info

VAE_CHOICES = ("Automatic", "None")  # the model's own VAE; ldm loads no separate VAE files yet


class A1111Api:
    def __init__(self, server: Server):
        self.server = server

    def register(self, app: FastAPI) -> None:
        routes = [
            ("/sdapi/v1/txt2img", self.txt2img, ["POST"], schema.ImageResponse),
            ("/sdapi/v1/img2img", self.img2img, ["POST"], schema.ImageResponse),
            ("/sdapi/v1/progress", self.progress, ["GET"], schema.ProgressResponse),
            ("/sdapi/v1/interrupt", self.interrupt, ["POST"], None),
            ("/sdapi/v1/skip", self.skip, ["POST"], None),
            ("/sdapi/v1/options", self.get_options, ["GET"], dict[str, Any]),
            ("/sdapi/v1/options", self.set_options, ["POST"], None),
            ("/sdapi/v1/sd-models", self.sd_models, ["GET"], list[schema.SDModelItem]),
            ("/sdapi/v1/refresh-checkpoints", self.refresh_checkpoints, ["POST"], None),
            ("/sdapi/v1/sd-vae", self.sd_vae, ["GET"], list[schema.SDVaeItem]),
            ("/sdapi/v1/samplers", self.samplers, ["GET"], list[schema.SamplerItem]),
            ("/sdapi/v1/schedulers", self.schedulers, ["GET"], list[schema.SchedulerItem]),
            ("/sdapi/v1/loras", self.loras, ["GET"], list[schema.LoraItem]),
            ("/sdapi/v1/refresh-loras", self.refresh_checkpoints, ["POST"], None),
            ("/sdapi/v1/embeddings", self.embeddings, ["GET"], schema.EmbeddingsResponse),
            ("/sdapi/v1/upscalers", self.empty_list, ["GET"], list[dict[str, Any]]),
            ("/sdapi/v1/latent-upscale-modes", self.empty_list, ["GET"], list[dict[str, Any]]),
            ("/sdapi/v1/face-restorers", self.empty_list, ["GET"], list[dict[str, Any]]),
            ("/sdapi/v1/hypernetworks", self.empty_list, ["GET"], list[dict[str, Any]]),
            ("/sdapi/v1/prompt-styles", self.empty_list, ["GET"], list[dict[str, Any]]),
            ("/sdapi/v1/script-info", self.empty_list, ["GET"], list[dict[str, Any]]),
            ("/sdapi/v1/realesrgan-models", self.empty_list, ["GET"], list[dict[str, Any]]),
            ("/sdapi/v1/sd-modules", self.empty_list, ["GET"], list[dict[str, Any]]),
            ("/sdapi/v1/extensions", self.empty_list, ["GET"], list[dict[str, Any]]),
            ("/sdapi/v1/scripts", self.scripts, ["GET"], schema.ScriptsList),
            ("/sdapi/v1/memory", self.memory, ["GET"], schema.MemoryResponse),
            ("/sdapi/v1/png-info", self.png_info, ["POST"], schema.PNGInfoResponse),
            ("/controlnet/model_list", self.controlnet_models, ["GET"], dict[str, list[str]]),
            ("/controlnet/module_list", self.controlnet_modules, ["GET"], dict[str, list[str]]),
        ]
        for path, endpoint, methods, response_model in routes:
            app.add_api_route(path, endpoint, methods=methods, response_model=response_model)

    # --- generation --------------------------------------------------------------------------------

    async def txt2img(self, body: schema.Txt2ImgRequest) -> schema.ImageResponse:
        return await self._generate(body, img2img=False)

    async def img2img(self, body: schema.Img2ImgRequest) -> schema.ImageResponse:
        return await self._generate(body, img2img=True)

    async def _generate(self, body: schema.GenerationFields, img2img: bool) -> schema.ImageResponse:
        """Queue the request and wait for it without holding a thread (many may wait; the pool is small)."""
        server = self.server
        can_save = server.config.outputs is not None
        request = await run_in_threadpool(job_request, body, server.config.limits, server.defaults(), img2img, can_save)
        job = server.queue.submit(request)
        await finished(job)
        if job.state == "failed":
            raise job.error if isinstance(job.error, LdmError) else JobCrashed(job)
        return await run_in_threadpool(self._answer, job, body, img2img)

    def _answer(self, job: Job, body: schema.GenerationFields, img2img: bool) -> schema.ImageResponse:
        """A1111's answer: the images as base64 PNGs, the request echoed, ``info`` as a JSON string."""
        images = [png_base64(image, p) for image, p in zip(job.images, job.parameters)] if body.send_images else []
        parameters = body.model_dump()
        if img2img and not getattr(body, "include_init_images", False):  # as A1111: the images are not sent back
            parameters.update(init_images=None, mask=None)
        model = self.server.engine.model
        answer = schema.ImageResponse(images=images, parameters=parameters, info=info_json(job, body, model.stem, model.short_hash))
        job.changed(images=[], preview=None)  # handed back: the job's history entry keeps its infotexts only
        return answer

    def progress(self, skip_current_image: bool = False) -> schema.ProgressResponse:
        """The running job's progress, A1111's ``state`` and a preview of its first image."""
        job = self.server.queue.current
        state = {
            "skipped": bool(job and job.skipped), "interrupted": bool(job and job.interrupted), "stopping_generation": False,
            "job": f"task({job.id})" if job else "", "job_count": job.request.n_iter if job else 0,
            "job_timestamp": job_timestamp(job.created) if job else "0", "job_no": job.batch if job else 0,
            "sampling_step": job.step if job else 0, "sampling_steps": job.steps if job else 0,
        }
        if job is None:
            return schema.ProgressResponse(progress=0, eta_relative=0, state=state)
        preview = job.preview
        image = None if skip_current_image or preview is None else png_base64_plain(preview)
        text = f"batch {job.batch + 1}/{job.request.n_iter}, step {job.step}/{job.steps}"
        return schema.ProgressResponse(
            progress=job.progress, eta_relative=job.eta, state=state, current_image=image, textinfo=text, current_task=f"task({job.id})"
        )

    def interrupt(self) -> dict:
        self.server.queue.interrupt()
        return {}

    def skip(self) -> dict:
        self.server.queue.skip()
        return {}

    # --- options and lists -------------------------------------------------------------------------

    def get_options(self) -> dict[str, Any]:
        engine = self.server.engine
        return {
            "sd_model_checkpoint": engine.model.title,
            "sd_checkpoint_hash": engine.model.sha256,
            "CLIP_stop_at_last_layers": (engine.clip_skip or 0) + 1,
            "sd_vae": "Automatic",
            "samples_format": "png",
            "outdir_samples": str(self.server.config.outputs or ""),
        }

    def set_options(self, body: dict[str, Any]) -> None:
        """Set ``sd_model_checkpoint`` (switch models: waits for the running job), ``CLIP_stop_at_last_layers``, ``sd_vae``."""
        if "CLIP_stop_at_last_layers" in body:
            layers = body["CLIP_stop_at_last_layers"]
            if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
                raise SettingError(f"{{CLIP_stop_at_last_layers}} must be an integer of 1 or more, got {checks.shown(layers)}")
        vae = body.get("sd_vae", "Automatic")
        if vae not in VAE_CHOICES:
            raise HTTPException(status_code=404, detail=f"VAE {vae!r} not found; ldm uses the model's own VAE (Automatic)")
        if "sd_model_checkpoint" in body:
            entry = self.server.catalog.find_model(str(body["sd_model_checkpoint"]))
            if entry is None:
                raise HTTPException(status_code=404, detail=f"model {body['sd_model_checkpoint']!r} not found")
            self.server.engine.switch(entry)
        if "CLIP_stop_at_last_layers" in body:
            self.server.engine.clip_skip = body["CLIP_stop_at_last_layers"] - 1 or None

    def sd_models(self) -> list[schema.SDModelItem]:
        return [
            schema.SDModelItem(title=m.title, model_name=m.stem, hash=m.short_hash, sha256=m.sha256, filename=str(m.path))
            for m in self.server.catalog.models
        ]

    def refresh_checkpoints(self) -> None:
        self.server.catalog.refresh()

    def sd_vae(self) -> list[schema.SDVaeItem]:
        return []

    def samplers(self) -> list[schema.SamplerItem]:
        return [schema.SamplerItem(name=s.name, aliases=list(s.aliases), options={}) for s in samplers()]

    def schedulers(self) -> list[schema.SchedulerItem]:
        return [
            schema.SchedulerItem(name=name, label=label, aliases=None, default_rho=rho, need_inner_model=False)
            for name, label, rho in SCHEDULE_TYPES.values()
        ]

    def loras(self) -> list[schema.LoraItem]:
        return [schema.LoraItem(name=path.stem, alias=path.stem, path=str(path)) for path in self.server.catalog.loras()]

    def embeddings(self) -> schema.EmbeddingsResponse:
        """The embeddings the loaded model reads, and the files of ``--embeddings-dir`` it does not (another
        width, or unreadable: those without their fields), as A1111 lists them."""
        embeddings = self.server.engine.pipeline.embeddings
        loaded = {name: embedding_item(e) for name, e in embeddings.loaded.items()}
        skipped = {name: embedding_item(s.embedding) for name, s in embeddings.skipped.items()}
        return schema.EmbeddingsResponse(loaded=loaded, skipped=skipped)

    def controlnet_models(self) -> dict[str, list[str]]:
        """The sd-webui-controlnet extension's model list: ``--controlnet-dir``'s ControlNets by title."""
        return {"model_list": list(controlnet_models(self.server.config.controlnet_dir))}

    def controlnet_modules(self) -> dict[str, list[str]]:
        """The extension's preprocessors that ldm has."""
        return {"module_list": list(MODULES)}

    def empty_list(self) -> list[dict[str, Any]]:
        return []

    def scripts(self) -> schema.ScriptsList:
        return schema.ScriptsList()

    def memory(self) -> schema.MemoryResponse:
        return schema.MemoryResponse(ram=ram(), cuda=cuda_memory())

    def png_info(self, body: schema.PNGInfoRequest) -> schema.PNGInfoResponse:
        with open_base64_image(body.image, "image") as image:
            text = image.info.get("parameters")
        items, parameters = png_info(text)
        return schema.PNGInfoResponse(info=text or "", items=items, parameters=parameters)


def embedding_item(embedding) -> schema.EmbeddingItem:
    """A1111's fields of an embedding (``ldm.adapters.embeddings.Embedding``), or none for an unreadable file."""
    if embedding is None:
        return schema.EmbeddingItem()
    return schema.EmbeddingItem(
        step=embedding.step, sd_checkpoint=embedding.sd_checkpoint, sd_checkpoint_name=embedding.sd_checkpoint_name,
        shape=embedding.width, vectors=embedding.count,
    )  # fmt: skip


def job_timestamp(created: float) -> str:
    import time

    return time.strftime("%Y%m%d%H%M%S", time.localtime(created))


def png_base64_plain(image) -> str:
    import base64

    return base64.b64encode(png_bytes(image, None)).decode("ascii")


def ram() -> dict[str, int]:
    """The machine's memory in bytes (POSIX ``sysconf``)."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return {"error": "unavailable"}
    return {"free": free, "used": total - free, "total": total}


def cuda_memory() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"error": "unavailable"}
    free, total = torch.cuda.mem_get_info()
    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
        "reserved": {"current": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_reserved()},
    }


async def finished(job: Job) -> None:
    """Until ``job`` has finished: woken by the worker's thread when it does, no polling."""
    loop = asyncio.get_running_loop()
    end = loop.create_future()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(lambda: end.done() or end.set_result(None))
        except RuntimeError:  # the server's loop has closed (shutting down): nobody waits any more
            pass

    job.when_finished(wake)
    await end
