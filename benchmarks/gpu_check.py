"""The GPU check: one command on one CUDA GPU, one JSON of what ldm does there.

    python benchmarks/gpu_check.py            # full-size SD 1.5 architecture (random weights), 512x512
    python benchmarks/gpu_check.py --quick    # a small model at 256x256: the same checks in seconds

Written to finish within 8 minutes on one datacenter GPU. It prints one JSON object and writes it to
``benchmarks/results/gpu_check.json``:

- ``device``: the GPU, its compute capability, torch's and CUDA's versions, xformers' if installed;
- ``fp16_vs_fp32``: the largest pixel difference between the fp16 and the fp32 image of the same
  seed, on the tests' random SD 1.x and SD 2.x (v-prediction) models;
- ``recipes``: seconds per image, denoising steps per second and peak GPU memory at batch 1 and 4
  for the standard recipe (20 DPM-Solver++ steps, guidance 7.5, KL decoder) and the fast one
  (4 ``lcm`` steps, guidance 1, TAESD decoder; a fused LCM-LoRA changes no shape, so it costs no time);
- ``attention``: the guided U-Net step with SDPA and with xformers (where installed);
- ``vae_overflow``: latents whose fp16 decode overflows are decoded again in fp32 and give a finite image.

Without a CUDA device it prints ``{"skipped": "..."}`` and exits 0; ``tests/test_gpu_check.py``
runs the check where CUDA is present and its CPU-side pieces everywhere.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import FULL, QUICK, RESULTS_DIR, ModelSpec, build_model  # noqa: E402

from ldm import Pipeline  # noqa: E402
from ldm.errors import ConfigError  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon"
RECIPES = {
    "standard": {"scheduler": "dpm-solver++", "num_inference_steps": 20, "guidance_scale": 7.5},
    "fast": {"scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0},
}


def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info |= {"name": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
                 "cuda": torch.version.cuda}
    try:
        import xformers

        info["xformers"] = xformers.__version__
    except ImportError:
        info["xformers"] = None
    return info


def image_difference(device: torch.device, dtype: torch.dtype, family: str) -> float:
    """Largest |pixel| difference of the tests' random ``family`` model in ``dtype`` against fp32, same seed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_models import diffusers_pipeline, ldm_pipeline

    pipe = ldm_pipeline(diffusers_pipeline(family)).to(device)
    call = {"prompt": PROMPT, "seed": 0, "num_inference_steps": 8, "height": 64, "width": 64, "output_type": "pt"}
    exact = pipe(**call).images
    low = pipe.to(dtype=dtype)(**call).images
    return float((low.float() - exact.float()).abs().max())


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 2) -> tuple[float, float]:
    """(median seconds, peak memory MiB) of ``fn`` after one warm-up."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def recipe_times(pipe: Pipeline, taesd: Pipeline | None, spec: ModelSpec, device: torch.device) -> dict:
    """Seconds per image, steps per second and peak memory of each recipe at batch 1 and 4."""
    results = {}
    for name, recipe in RECIPES.items():
        runner = taesd if name == "fast" and taesd is not None else pipe
        for batch in (1, 4):
            call = {"prompt": PROMPT, "seed": 0, "height": spec.image_size, "width": spec.image_size,
                    "num_images_per_prompt": batch, "output_type": "pt", **recipe}
            seconds, peak = timed(lambda: runner(**call), device)
            results[f"{name}, batch {batch}"] = {
                "seconds_per_image": seconds / batch, "steps_per_second": recipe["num_inference_steps"] / seconds,
                "peak_gpu_mib": peak,
            }
    return results


def attention_times(pipe: Pipeline, spec: ModelSpec, device: torch.device) -> dict:
    """The guided U-Net step (one latent row, two text rows) with each attention backend."""
    side = spec.image_size // 8
    x = torch.randn(1, 4, side, side, device=device, dtype=pipe.dtype)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=pipe.dtype)
    t = torch.tensor(500, device=device)
    results = {}
    for backend in ("sdpa", "xformers"):
        try:
            pipe.configure(attention=backend)
        except ConfigError as error:  # xformers not installed: reported, not fatal
            results[backend] = f"unavailable: {error}"
            continue
        with torch.inference_mode():
            results[backend] = {"seconds": timed(lambda: pipe.unet(x, t, text), device)[0]}
    pipe.configure(attention="sdpa")
    return results


def vae_overflow(pipe: Pipeline) -> dict:
    """Latents far outside the usual range: the fp16 decode overflows and the fp32 retry must rescue it."""
    side = 16
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)).to(pipe.device) * 60
    images = pipe.decode_latents(latents)
    return {"finite": bool(torch.isfinite(images).all()), "dtype": str(pipe.dtype)}


def main(argv: list[str]) -> dict:
    if not torch.cuda.is_available():
        result = {"skipped": "no CUDA device: the GPU figures are not measured on this machine"}
        print(json.dumps(result))
        return result
    device = torch.device("cuda")
    spec = QUICK if "--quick" in argv else FULL
    folder, _ = build_model(spec)
    result = {"device": device_info(device), "model": spec.name, "image_size": spec.image_size}
    result["fp16_vs_fp32"] = {family: image_difference(device, torch.float16, family) for family in ("sd1", "sd2")}
    pipe = Pipeline.from_pretrained(folder, device=device, dtype=torch.float16)
    taesd = fast_pipeline(folder, device)
    result["recipes"] = recipe_times(pipe, taesd, spec, device)
    result["attention"] = attention_times(pipe, spec, device)
    result["vae_overflow"] = vae_overflow(pipe)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


def fast_pipeline(folder: Path, device: torch.device) -> Pipeline | None:
    """The model with a random full-size TAESD as its VAE (diffusers' ``AutoencoderTiny`` defaults)."""
    from diffusers import AutoencoderTiny

    taesd_folder = folder.parent / f"{folder.name}-taesd"
    if not taesd_folder.exists():
        torch.manual_seed(0)
        AutoencoderTiny().save_pretrained(taesd_folder)
    pipe = Pipeline.from_pretrained(folder, device=device, dtype=torch.float16)
    pipe.load_vae(taesd_folder)
    return pipe


if __name__ == "__main__":
    main(sys.argv[1:])
