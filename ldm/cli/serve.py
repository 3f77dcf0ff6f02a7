"""`ldm serve`: AUTOMATIC1111's HTTP API and ldm's job API on one loaded model (docs/server.md).

Every flag is checked before the model loads: a host other than this machine's loopback needs
``--api-auth`` (or ``--insecure-no-auth``), and is refused in one line otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm import checks
from ldm.errors import InputError


def register(sub) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve the A1111 HTTP API and ldm's job API",
        description="Serve AUTOMATIC1111's HTTP API (/sdapi/v1) and ldm's job API (/ldm/v1) on one loaded model.",
    )
    parser.add_argument("--model", type=Path, metavar="PATH", help="the model to load (default: the project's model)")
    parser.add_argument("--models-dir", type=Path, metavar="DIR", help="models that POST /sdapi/v1/options can switch to")
    parser.add_argument("--loras-dir", type=Path, metavar="DIR", help="LoRA files listed by /sdapi/v1/loras")
    parser.add_argument(
        "--embeddings-dir", type=Path, metavar="DIR", help="textual-inversion embeddings that prompts may use by their file's stem"
    )
    parser.add_argument("--controlnet-dir", type=Path, metavar="DIR", help="ControlNet files and folders that requests' controlnet units name")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-auth)")
    parser.add_argument("--port", type=int, default=7860, help="default 7860, as A1111")
    parser.add_argument("--api-auth", metavar="USER:PASS[,USER2:PASS2]", help="HTTP Basic auth on every route")
    parser.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback --host without --api-auth")
    parser.add_argument("--queue-size", type=int, default=16, metavar="N", help="jobs that may wait; more get 429 (default 16)")
    parser.add_argument("--outputs", type=Path, metavar="DIR", help="where save_images writes (default: no files are written)")
    parser.add_argument("--max-pixels", type=int, default=checks.MAX_PIXELS, metavar="N", help="width x height x batch_size per batch")
    parser.add_argument("--max-steps", type=int, default=150, metavar="N", help="steps per image (default 150)")
    parser.add_argument("--max-images", type=int, default=64, metavar="N", help="batch_size x n_iter per request (default 64)")
    parser.add_argument("--max-body-mb", type=int, default=64, metavar="MB", help="request body size (default 64)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on CUDA, fp32 on the CPU")
    parser.set_defaults(run=run, flag=flag)


def flag(field: str) -> str:
    return field if field.startswith("-") else "--" + field.replace("_", "-")


def build_config(args: argparse.Namespace):
    """The ``ServerConfig`` of the flags, checked (no model loaded, no socket opened)."""
    from ldm.server.config import Limits, ServerConfig, parse_auth

    limits = Limits(
        max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images,
        max_body_bytes=checks.check_count(args.max_body_mb, "--max-body-mb") * 1024 * 1024,
    )
    return ServerConfig(
        model=args.model, models_dir=args.models_dir, loras_dir=args.loras_dir, embeddings_dir=args.embeddings_dir,
        controlnet_dir=args.controlnet_dir,
        host=args.host, port=args.port, api_auth=parse_auth(args.api_auth) if args.api_auth else (),
        insecure_no_auth=args.insecure_no_auth, queue_size=args.queue_size, outputs=args.outputs,
        device=args.device, dtype=args.dtype, limits=limits,
    )


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise InputError("ldm serve needs FastAPI and uvicorn: pip install 'ldm[serve]'") from None
    config = build_config(args)
    from ldm.server.app import serve

    serve(config)
    return 0
