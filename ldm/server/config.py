"""A server's set-up: what ``ldm serve``'s flags say, checked once, before anything is loaded.

The app factory (``ldm.server.app.create_app``) takes one ``ServerConfig``; nothing of the server
lives in module globals, so a test (or a program) can run several servers in one process.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from ldm import checks
from ldm.errors import InputError
from ldm.images import check_output_folder

LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each over-limit request is a 422 naming its field."""

    max_pixels: int = checks.MAX_PIXELS  # width x height x batch_size, as ``ldm txt2img --max-pixels``
    max_steps: int = 150  # A1111's own slider stops at 150
    max_images: int = 64  # batch_size x n_iter of one request
    max_prompt_chars: int = 20_000  # of prompt and negative_prompt, each
    max_body_bytes: int = 64 * 1024 * 1024  # a request body (init images are base64 in the JSON)

    def __post_init__(self) -> None:
        checks.check_max_pixels(self.max_pixels, "--max-pixels")
        checks.check_steps(self.max_steps, "--max-steps")
        for name in ("max_images", "max_prompt_chars", "max_body_bytes"):
            checks.check_count(getattr(self, name), "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class ServerConfig:
    """Every choice of one server process (``ldm serve``'s flags)."""

    model: Path | None = None  # None: the project's default model
    models_dir: Path | None = None  # the models POST /sdapi/v1/options can switch to
    loras_dir: Path | None = None
    embeddings_dir: Path | None = None
    controlnet_dir: Path | None = None  # the ControlNets requests' alwayson_scripts.controlnet units name
    host: str = "127.0.0.1"
    port: int = 7860
    api_auth: tuple[tuple[str, str], ...] = ()  # (user, password) pairs; HTTP Basic on every route
    insecure_no_auth: bool = False  # serve a non-loopback address without auth, knowingly
    queue_size: int = 16  # jobs waiting (the running one not counted); more is a 429
    outputs: Path | None = None  # save_images writes here; None: the server writes no files
    device: str | None = None  # None: CUDA when there is one, else the CPU
    dtype: str | None = None  # fp32, fp16, bf16; None: fp16 on CUDA, fp32 elsewhere
    history: int = 32  # finished jobs kept for GET /ldm/v1/jobs/{id} (a job API job's images stay in memory)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        checks.check_count(self.queue_size, "--queue-size")
        checks.check_count(self.history, "history")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be from 0 to 65535, got {self.port}")
        for name in ("models_dir", "loras_dir", "embeddings_dir", "controlnet_dir"):
            folder = getattr(self, name)
            if folder is not None and not Path(folder).is_dir():
                raise InputError(f"--{name.replace('_', '-')} {folder} is not a folder")
        if self.dtype is not None and self.dtype not in ("fp32", "fp16", "bf16"):
            raise InputError(f"--dtype must be fp32, fp16 or bf16, got {self.dtype!r}")
        if self.model is not None and not Path(self.model).exists():
            raise InputError(f"--model {self.model} does not exist; pass a diffusers folder or a .safetensors/.ckpt file")
        if self.outputs is not None:
            check_output_folder(self.outputs, "--outputs")  # a folder, or one that can be made, writable
        if not self.api_auth and not self.insecure_no_auth and not is_loopback(self.host):
            raise InputError(
                f"--host {self.host} lets other machines reach the server; protect it with --api-auth USER:PASS "
                "(or, on a network you trust, pass --insecure-no-auth)"
            )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any address


def parse_auth(text: str) -> tuple[tuple[str, str], ...]:
    """``USER:PASS[,USER2:PASS2]`` as (user, password) pairs; a password may contain ':' but not ','."""
    pairs = []
    for item in text.split(","):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise InputError("--api-auth takes USER:PASS[,USER2:PASS2] with a non-empty user and password each")
        pairs.append((user, password))
    return tuple(pairs)
