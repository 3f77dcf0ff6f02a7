"""The FastAPI app of ``ldm serve``: made by ``create_app(config)``, with no global state.

    create_app(ServerConfig(...)) -> FastAPI   loads the model; the job worker runs while the app does;
                                               the web page at / (static/) talks to the job API
    serve(config)                              create_app + uvicorn on config.host:config.port

Errors are answered without a traceback: a bad setting is a 422 naming the JSON field
(``{"detail": [{"loc": ["body", field], "msg": ..., "type": "value_error"}]}``, FastAPI's own
shape), an unknown sampler A1111's 400 "Sampler not found", a full queue a 429 with
``Retry-After``, a missing model or job a 404, a bug a 500 whose details go to the server's log only.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ldm import __version__
from ldm.errors import LdmError, SettingError
from ldm.server.a1111 import A1111Api
from ldm.server.config import ServerConfig
from ldm.server.guard import Guard
from ldm.server.jobs import JobCrashed, QueueFull
from ldm.server.names import SamplerNotFound
from ldm.server.native import NativeApi
from ldm.server.service import Server
from ldm.server.translate import ModelNotFound, label

def create_app(config: ServerConfig) -> FastAPI:
    """The app for ``config``: the model loaded, the A1111 and native routes, auth and limits."""
    server = Server.load(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        try:
            yield
        finally:
            server.close()

    app = FastAPI(title="ldm", version=__version__, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Guard, credentials=config.api_auth, max_body_bytes=config.limits.max_body_bytes)
    add_error_answers(app)
    A1111Api(server).register(app)
    NativeApi(server).register(app)
    add_page(app)
    return app


STATIC = Path(__file__).parent / "static"  # the web page: HTML, one JS and one CSS file, no build step


def add_page(app: FastAPI) -> None:
    """The web page at ``/``: a client of the job API, like any other (behind the same auth)."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/", page, methods=["GET"], response_class=FileResponse, include_in_schema=False)


async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


def add_error_answers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(SettingError, bad_setting)
    app.add_exception_handler(SamplerNotFound, sampler_not_found)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(LdmError, user_error)
    app.add_exception_handler(JobCrashed, job_crashed)
    app.add_exception_handler(ModelNotFound, model_not_found)
    app.add_exception_handler(Exception, internal_error)


def field_error(loc: list, message: str, kind: str = "value_error") -> dict:
    return {"loc": loc, "msg": message, "type": kind}


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, without echoing the input (it may be megabytes of base64)."""
    detail = [field_error(list(e["loc"]), e["msg"], e["type"]) for e in error.errors()]
    return JSONResponse(status_code=422, content={"detail": detail})


async def bad_setting(request: Request, error: SettingError) -> JSONResponse:
    loc = ["body", label(error.fields[0])] if error.fields else ["body"]
    return JSONResponse(status_code=422, content={"detail": [field_error(loc, error.worded(label))]})


async def sampler_not_found(request: Request, error: SamplerNotFound) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": "Sampler not found"})


async def queue_full(request: Request, error: QueueFull) -> JSONResponse:
    return JSONResponse(status_code=429, content={"detail": str(error)}, headers={"Retry-After": str(error.retry_after)})


async def user_error(request: Request, error: LdmError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": str(error)})


async def model_not_found(request: Request, error: ModelNotFound) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": str(error)})


async def job_crashed(request: Request, error: JobCrashed) -> JSONResponse:
    """A 500 for a job's bug, already logged by the worker; the connection stays usable."""
    return JSONResponse(status_code=500, content={"error": type(error.job.error).__name__, "detail": f"{error}; see the server's log"})


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    # Starlette logs it and closes the connection after this answer: a bug in a handler, not in a job.
    return JSONResponse(status_code=500, content={"error": type(error).__name__, "detail": "internal error; see the server's log"})


def serve(config: ServerConfig) -> None:
    """Run the server until it is stopped (Ctrl-C)."""
    import uvicorn

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info")
