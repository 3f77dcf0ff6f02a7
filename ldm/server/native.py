"""ldm's own job API (``/ldm/v1/jobs``): submit and get an id at once, then poll, stream or cancel.

    POST   /ldm/v1/jobs                    the same fields as /sdapi/v1/txt2img (img2img with init_images);
                                           None = the model's choice -> 202 {id, state, position, url}
    GET    /ldm/v1/jobs                    the queue: the running job, then the waiting ones in order
    GET    /ldm/v1/jobs/{id}               its state: queued (position), running (step, preview),
                                           done (image URLs, seeds, infotexts), failed (error), cancelled
    DELETE /ldm/v1/jobs/{id}               cancel a queued or running job
    GET    /ldm/v1/jobs/{id}/events        server-sent events: the state after every change, until it ends
    GET    /ldm/v1/jobs/{id}/images/{n}    image n as PNG (with its infotext)
    GET    /ldm/v1/jobs/{id}/preview       the running batch's preview as PNG

Job ids are random UUIDs, unique across server processes (several behind one proxy).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import FastAPI, HTTPException, Response
from fastapi.responses import StreamingResponse

from ldm.images import GenerationParameters, format_parameters
from ldm.server import schema
from ldm.server.jobs import FINISHED, Job
from ldm.server.service import Server
from ldm.server.translate import job_request, png_bytes, worded

PREFIX = "/ldm/v1/jobs"
EVENT_POLL_SECONDS = 0.1  # how often an event stream looks for a change
KEEPALIVE_SECONDS = 15.0  # a comment line so proxies keep an idle stream open
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: pass each event on at once


class NativeApi:
    def __init__(self, server: Server):
        self.server = server

    def register(self, app: FastAPI) -> None:
        app.add_api_route(PREFIX, self.submit, methods=["POST"], status_code=202, response_model=schema.JobSubmitted)
        app.add_api_route(PREFIX, self.list_jobs, methods=["GET"], response_model=schema.JobList)
        app.add_api_route(PREFIX + "/{job_id}", self.status, methods=["GET"], response_model=schema.JobStatus)
        app.add_api_route(PREFIX + "/{job_id}", self.cancel, methods=["DELETE"], response_model=schema.JobStatus)
        app.add_api_route(PREFIX + "/{job_id}/events", self.events, methods=["GET"], response_class=StreamingResponse)
        app.add_api_route(PREFIX + "/{job_id}/images/{index}", self.image, methods=["GET"], response_class=Response)
        app.add_api_route(PREFIX + "/{job_id}/preview", self.preview, methods=["GET"], response_class=Response)

    def submit(self, body: schema.GenerationFields) -> schema.JobSubmitted:
        server = self.server
        request = job_request(body, server.config.limits, server.defaults(), False, server.config.outputs is not None)
        job = server.queue.submit(request)
        return schema.JobSubmitted(id=job.id, state=job.state, position=server.queue.position(job), url=f"{PREFIX}/{job.id}")

    def list_jobs(self) -> schema.JobList:
        return schema.JobList(jobs=[self.describe(job) for job in self.server.queue.jobs()])

    def status(self, job_id: str) -> schema.JobStatus:
        return self.describe(self.find(job_id))

    def cancel(self, job_id: str) -> schema.JobStatus:
        job = self.find(job_id)
        if job.state in FINISHED:
            raise HTTPException(status_code=409, detail=f"job {job_id} is already {job.state}")
        self.server.queue.cancel(job)
        return self.describe(job)

    async def events(self, job_id: str) -> StreamingResponse:
        job = self.find(job_id)
        return StreamingResponse(self._stream(job), media_type="text/event-stream", headers=STREAM_HEADERS)

    def image(self, job_id: str, index: int) -> Response:
        job = self.find(job_id)
        if not 0 <= index < len(job.images):
            raise HTTPException(status_code=404, detail=f"job {job_id} has no image {index}")
        return Response(png_bytes(job.images[index], job.parameters[index]), media_type="image/png")

    def preview(self, job_id: str) -> Response:
        preview = self.find(job_id).preview
        if preview is None:
            raise HTTPException(status_code=404, detail=f"job {job_id} has no preview yet")
        return Response(png_bytes(preview, None), media_type="image/png")

    # --- helpers -----------------------------------------------------------------------------------

    def find(self, job_id: str) -> Job:
        job = self.server.queue.get(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id} (unknown, or finished long ago)")
        return job

    def describe(self, job: Job) -> schema.JobStatus:
        url = f"{PREFIX}/{job.id}"
        return schema.JobStatus(
            id=job.id, state=job.state, position=self.server.queue.position(job), progress=job.progress,
            eta_relative=job.eta, batch=job.batch, n_iter=job.request.n_iter, step=job.step, steps=job.steps,
            preview=f"{url}/preview" if job.preview is not None and job.state == "running" else None,
            images=[f"{url}/images/{i}" for i in range(len(job.images))], seeds=[p.seed for p in job.parameters],
            infotexts=[format_parameters(p) for p in job.parameters],
            parameters=[image_parameters(p) for p in job.parameters], error=worded(job.error) if job.error else None,
            created=job.created, started=job.started, finished=job.finished,
        )

    async def _stream(self, job: Job) -> AsyncIterator[str]:
        """An event per change (``progress`` while queued or running, then the final state's name), then the end."""
        seen, quiet = -1, 0.0
        while True:
            if job.version != seen:
                seen, quiet = job.version, 0.0
                status = self.describe(job)
                yield f"event: {status.state if status.state in FINISHED else 'progress'}\ndata: {status.model_dump_json()}\n\n"
                if status.state in FINISHED:
                    return
            elif quiet >= KEEPALIVE_SECONDS:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(EVENT_POLL_SECONDS)
            quiet += EVENT_POLL_SECONDS


def image_parameters(params: GenerationParameters) -> schema.ImageParameters:
    """An image's parameters as the request fields that make it again (``POST`` them back as they are)."""
    return schema.ImageParameters(
        prompt=params.prompt, negative_prompt=params.negative_prompt, seed=params.seed, steps=params.steps,
        cfg_scale=params.cfg_scale, width=params.width, height=params.height, sampler_name=params.sampler,
        scheduler=params.extra.get("Schedule type"),
    )
