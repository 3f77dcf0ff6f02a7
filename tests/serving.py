"""A real ldm server on a free loopback port, in a thread, for the server tests (real HTTP, real uvicorn)."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import httpx
import uvicorn
from PIL import Image

from ldm.server.app import create_app
from ldm.server.config import ServerConfig


class LiveServer:
    """``create_app(config)`` served by uvicorn on 127.0.0.1:<free port> until ``stop``."""

    def __init__(self, config: ServerConfig):
        self.app = create_app(config)
        self.server_state = self.app.state.server
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 60, **kwargs})

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


def post_once(config: ServerConfig, route: str, request: dict) -> httpx.Response:
    """One POST of ``request`` to ``route`` on a server of ``config`` started for it and stopped after it."""
    server = LiveServer(config)
    try:
        with server.client() as client:
            return client.post(route, json=request)
    finally:
        server.stop()


def png_base64(image: Image.Image) -> str:
    """A PIL image as the base64 PNG text A1111's API takes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def png_data_url(size: int = 64, colour=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decode_png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def wait_for(condition, timeout: float = 60.0, every: float = 0.02):
    """Poll ``condition()`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


class Background:
    """Run ``function`` in a thread; ``result()`` waits for its return value (or raises its error)."""

    def __init__(self, function, *args, **kwargs):
        self.value = self.error = None
        self.finished_at: float | None = None

        def target():
            try:
                self.value = function(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - handed to the test by result()
                self.error = error
            self.finished_at = time.monotonic()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 120.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the background call did not finish"
        if self.error is not None:
            raise self.error
        return self.value
