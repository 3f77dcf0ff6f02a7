"""Training speed: images per second and peak memory of ``ldm.training.train`` on this machine.

    python benchmarks/train_speed.py                      # small and full-size U-Net
    python benchmarks/train_speed.py --sizes full --full-mode full --steps 5
    python benchmarks/train_speed.py --sizes sdxl --steps 1 --mixed-precision bf16   # SDXL LoRA at 1024 px

Two workloads, each in its own process so one's peak memory does not inflate the other's:
  * small: the test-size SD-1-shaped U-Net (``UNetConfig.tiny()``), full fine-tuning, 64 px;
  * full:  the SD 1.5 U-Net (860 M parameters) with the SD VAE and CLIP ViT-L text tower,
    random weights, at ``--full-resolution`` (default 256 px). ``--full-mode auto`` trains the
    whole U-Net when AdamW's ~16 bytes per parameter (weights, gradients, two moments) fit in
    60 % of the available memory, otherwise LoRA rank 4 on the attention projections (the mode is
    part of the report);
  * sdxl:  the SDXL base architecture (2.6 B-parameter U-Net, SDXL VAE, CLIP ViT-L and OpenCLIP bigG),
    random weights, LoRA rank 4 with gradient checkpointing at ``--sdxl-resolution`` (default 1024 px),
    both text encoders frozen, in fp32 or with ``--mixed-precision bf16`` (the frozen weights in bf16).

The rate is measured from the run's own ``log.csv`` (time between the end of the first step,
which includes warm-up, and the end of the last). Peak memory is the process's maximum resident
set size (weights, optimizer state, activations and libraries) or, on CUDA, the peak allocated
device memory. Results print as one JSON line per workload.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.models import AutoencoderKL, UNet, UNetConfig, VAEConfig
from ldm.models.text_encoder import clip_config, load_tokenizer
from ldm.schedulers import SchedulerConfig
from ldm.training import DataConfig, ImageCaptionDataset, TrainConfig, scan_folder, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


@dataclass
class Models:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: SchedulerConfig
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None
    generation_config: dict = field(default_factory=dict)


def build(size: str, precision: str = "no") -> Models:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if size == "sdxl":
        return build_sdxl(torch.bfloat16 if precision == "bf16" else torch.float32)
    if size == "full":
        unet, vae, text = UNetConfig.sd1(), VAEConfig.sd(), clip_config("sd1")
    else:
        unet, vae = UNetConfig.tiny(), VAEConfig.tiny()
        text = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=2,
                              max_position_embeddings=77, hidden_act="quick_gelu")
    return Models(UNet(unet), AutoencoderKL(vae), CLIPTextModel(text), load_tokenizer("sd1"), SchedulerConfig())


def build_sdxl(dtype: torch.dtype) -> Models:
    """The SDXL base networks, made in ``dtype``: a LoRA run reads its model in the run's precision (``ldm finetune``'s
    ``load_dtype``), so no fp32 copy ever exists in a bf16 run."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ldm.models.text_encoder import clip_config_2, load_tokenizer_2

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return Models(
            UNet(UNetConfig.sdxl()), AutoencoderKL(VAEConfig.sdxl()), CLIPTextModel(clip_config("sdxl")), load_tokenizer("sdxl"),
            SchedulerConfig(), CLIPTextModelWithProjection(clip_config_2("sdxl")), load_tokenizer_2("sdxl"),
        )  # fmt: skip
    finally:
        torch.set_default_dtype(previous)


def choose_mode(requested: str, models: Models, device: torch.device) -> str:
    if requested != "auto":
        return requested
    needed = 16 * sum(p.numel() for p in models.unet.parameters())
    budget = torch.cuda.mem_get_info()[0] if device.type == "cuda" else common.available_bytes()
    return "full" if needed < 0.6 * budget else "lora"


def worker(size: str, resolution: int, steps: int, batch: int, mode: str, precision: str) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = build(size, precision)
    mode = "lora" if size == "sdxl" else choose_mode(mode, models, device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(max(4, batch)):
            Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(f"a photograph of thing number {i}")
        data = DataConfig(resolution=resolution)
        dataset = ImageCaptionDataset(scan_folder(folder, data), data)
        # No checkpoints (on by default): they are not what is timed, and the full model's is gigabytes.
        config = TrainConfig(max_steps=steps + 1, batch_size=batch, learning_rate=1e-5, checkpointing_steps=None,
                             lora_rank=4 if mode == "lora" else None, gradient_checkpointing=size == "sdxl",
                             mixed_precision=precision)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train(models, dataset, config, Path(tmp) / "run", show_progress=False)
        with open(Path(tmp) / "run" / "log.csv") as f:
            elapsed = [float(row["elapsed_seconds"]) for row in csv.DictReader(f)]
    seconds = elapsed[-1] - elapsed[0]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "size": size,
        "mode": mode,
        "mixed_precision": precision,
        "gradient_checkpointing": config.gradient_checkpointing,
        "unet_parameters_millions": round(sum(p.numel() for p in models.unet.parameters()) / 1e6, 1),
        "resolution": resolution,
        "batch_size": batch,
        "timed_steps": steps,
        "images_per_second": round(steps * batch / seconds, 4),
        "seconds_per_step": round(seconds / steps, 3),
        "peak_memory_gib": round(peak / 2**30, 2),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": cpu_description(),
        "load_average_1min": round(os.getloadavg()[0], 1),  # other work on the machine slows every number
    }


def cpu_description() -> str:
    """The CPU model and flags, and whether its bf16 is native (emulated bf16 runs slower than fp32)."""
    from ldm.kernels.cpu import this_cpu

    cpu = this_cpu()
    return f"{cpu.key}, bf16 {'native' if cpu.native_bf16 else 'emulated'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,full", help="comma-separated: small, full, sdxl")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--small-resolution", type=int, default=64)
    parser.add_argument("--full-resolution", type=int, default=256)
    parser.add_argument("--sdxl-resolution", type=int, default=1024)
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="bf16 autocast (CPU: native bf16 only)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--full-mode", choices=("auto", "full", "lora"), default="auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads of the measuring process (default: torch's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        resolutions = {"full": args.full_resolution, "sdxl": args.sdxl_resolution, "small": args.small_resolution}
        mode = args.full_mode if args.worker == "full" else "full"
        print(json.dumps(worker(args.worker, resolutions[args.worker], args.steps, args.batch_size, mode, args.mixed_precision)))
        return
    for size in args.sizes.split(","):
        command = [sys.executable, __file__, "--worker", size, "--steps", str(args.steps),
                   "--small-resolution", str(args.small_resolution), "--full-resolution", str(args.full_resolution),
                   "--sdxl-resolution", str(args.sdxl_resolution), "--mixed-precision", args.mixed_precision,
                   "--batch-size", str(args.batch_size), "--full-mode", args.full_mode]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            print(json.dumps({"size": size, "error": done.stderr.strip().splitlines()[-1:]}))
            continue
        print(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
