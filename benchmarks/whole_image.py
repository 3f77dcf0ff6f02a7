"""A whole image (prompt to pixels) of ldm against diffusers, and ldm's switchable speed-ups.

    python benchmarks/whole_image.py [--quick | --sd15-256] [--speedups | --speedups-only] [--size 1024] [--busy-core]

Both pipelines load the same diffusers folder and make one guided image
(DPM-Solver++(2M), guidance 7.5, a negative prompt) from the same initial
latents; the time covers text encoding, denoising and VAE decoding, after a
one-step warm-up call. Each engine runs in a fresh process per image, in two
alternated rounds (ABBA; the time is the mean of the two). Peak memory is the
process's resident high-water mark during the timed call, weights included (the
higher of the two rounds).

The one-shot row runs the real ``ldm txt2img`` command (seed 0 draws the same initial
latents) in a fresh process, which frees each network after its stage
(``weights_after_use="release"``); its peak is that whole process's resident
high-water mark, imports and loading included, against diffusers' standard pipeline
above. Its PNG must equal the reusable pipeline's image in 8 bits exactly.

``--speedups`` times ldm with each speed-up switched on and reports its
speed-up over ldm's exact image of the same run and its fidelity cost: the
PSNR of the image against the exact one, and (when the default model
``weights/ldm-shapes`` is installed) the prompt adherence of the pixel scorer.
``--speedups-only`` measures the speed-ups against the exact image and time of the
last comparison run. ``--size`` makes one large image with VAE tiling and sliced attention and
reports its time and peak memory. ``--busy-core`` runs it all while another process keeps one of the
cores busy (results in ``whole_image-busy-<spec>.json``).
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# Each speed-up as the ldm pipeline arguments that switch it on (docs/performance.md).
SPEEDUPS: dict[str, dict[str, Any]] = {
    "deepcache": {"deepcache_interval": 3},
    "guidance-truncation": {"guidance_fraction": 0.6},
    "token-merging": {"token_merging": 0.5},
}


RESULT_KEYS = ("by_steps", "ldm", "diffusers", "time_ratio", "peak_ratio", "psnr_ldm_vs_diffusers_db", "one_shot", "speedups", "large")


def initial_latents(size: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))


def make_pipeline(impl: str, folder: str, large: bool):
    """A callable (steps, latents, size, options) -> images (N, H, W, 3) float in [0, 1]."""
    if impl == "diffusers":
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if large:
            pipe.vae.enable_tiling()
            pipe.enable_attention_slicing()

        def generate(steps: int, latents: torch.Tensor, size: int, options: dict, output: str = "np") -> np.ndarray:
            return pipe(common.PROMPT, negative_prompt=common.NEGATIVE, num_inference_steps=steps,
                        guidance_scale=common.GUIDANCE, height=size, width=size, latents=latents,
                        output_type=output).images  # fmt: skip

        return generate
    from ldm import Pipeline

    pipe = Pipeline.from_pretrained(folder)
    if large:
        pipe.configure(decode_mode="tiled")
        pipe.configure(attention="sliced")

    def generate(steps: int, latents: torch.Tensor, size: int, options: dict, output: str = "np") -> np.ndarray:
        return pipe(common.PROMPT, negative_prompt=common.NEGATIVE, num_inference_steps=steps,
                    guidance_scale=common.GUIDANCE, height=size, width=size, latents=latents,
                    scheduler="dpm-solver++", output_type=output, **options).images  # fmt: skip

    return generate


def one_shot_cli(args: dict[str, Any]) -> dict[str, Any]:
    """``ldm txt2img`` as a user runs it, one image: wall time and peak RSS of that process, and its PNG."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "ldm", "txt2img", common.PROMPT, "--negative-prompt", common.NEGATIVE,
            "--model", args["folder"], "--seed", "0", "--steps", str(args["steps"]), "--scheduler", "dpm-solver++",
            "--guidance-scale", str(common.GUIDANCE), "--width", str(args["size"]), "--height", str(args["size"]),
            "--out", out, "--quiet",
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=common.REPO_DIR)
        seconds = time.perf_counter() - start
        # The only child of this worker: its peak resident memory (KiB on Linux).
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        (png,) = Path(out).glob("*.png")
        np.save(args["save"], np.asarray(Image.open(png)))
    return {"times": [seconds], "median_s": seconds, "peak_mib": peak}


def run(args: dict[str, Any]) -> dict[str, Any]:
    if args["impl"] == "ldm-cli":
        return one_shot_cli(args)
    size, steps = args["size"], args["steps"]
    generate = make_pipeline(args["impl"], args["folder"], args.get("large", False))
    latents = initial_latents(size)
    options = args.get("options", {})
    images = []
    if not args.get("large"):  # warm-up: one U-Net step, so kernels and allocator are primed
        generate(1, latents, size, options, "latent")
    result = common.measure(lambda: images.append(generate(steps, latents, size, options)), warmup=0, repeats=1)
    if args.get("save"):
        np.save(args["save"].format(impl=args["impl"]), images[-1])
    return result


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


ROUNDS = 2  # ABBA: one image per engine moved the time ratio by about 5 % between runs on this shared CPU


def compare(spec: common.ModelSpec, folder: Path, steps: int, tmp: Path) -> dict[str, Any]:
    """ldm and diffusers at ``steps`` steps, ``ROUNDS`` alternated rounds; the images' PSNR against each other."""
    base = {"spec": spec.name, "folder": str(folder), "size": spec.image_size, "steps": steps}
    runs = common.alternate("whole_image.py", {**base, "save": str(tmp / f"{{impl}}-{steps}.npy")}, ROUNDS)
    saves = {impl: tmp / f"{impl}-{steps}.npy" for impl in runs}
    summary = {
        impl: {"time_s": common.pooled(r), "peak_mib": common.max_of(r, "peak_mib"), "runs": r} for impl, r in runs.items()
    }
    return {
        **summary,
        "time_ratio": common.ratio(summary["ldm"]["time_s"], summary["diffusers"]["time_s"]),
        "peak_ratio": common.ratio(summary["ldm"]["peak_mib"], summary["diffusers"]["peak_mib"]),
        "psnr_ldm_vs_diffusers_db": psnr(np.load(saves["ldm"]), np.load(saves["diffusers"])),
    }


def compare_one_shot(spec: common.ModelSpec, folder: Path, tmp: Path, diffusers_peak: float) -> dict[str, Any]:
    """The one-shot ``ldm txt2img`` process against diffusers' standard pipeline; its PNG against ldm's image."""
    save = str(tmp / "ldm-cli.npy")
    args = {"spec": spec.name, "folder": str(folder), "size": spec.image_size, "steps": spec.steps, "save": save}
    result = common.run_worker("whole_image.py", {**args, "impl": "ldm-cli"})
    reusable = (np.load(tmp / f"ldm-{spec.steps}.npy")[0] * 255).round().astype(np.uint8)  # as ldm writes a PNG
    return {
        "time_s": result["median_s"],
        "peak_mib": result["peak_mib"],
        "peak_ratio": common.ratio(result["peak_mib"], diffusers_peak),
        "png_equals_reusable_pipeline_image": bool(np.array_equal(np.load(save), reusable)),
    }


def reference_path(spec: common.ModelSpec) -> Path:
    """Where the exact ldm image of the last comparison is kept, for speed-up runs made later."""
    return common.CACHE_DIR / (spec.model or spec.name) / f"ldm-exact-{spec.image_size}px-{spec.steps}.npy"


def speedups(spec: common.ModelSpec, folder: Path, tmp: Path, exact_seconds: float) -> dict[str, Any]:
    """Each speed-up's time, speed-up over the exact ldm image and PSNR against it."""
    reference = np.load(reference_path(spec))
    base = {"spec": spec.name, "folder": str(folder), "size": spec.image_size, "steps": spec.steps, "impl": "ldm"}
    out = {}
    for name, options in SPEEDUPS.items():
        save = str(tmp / f"{name}.npy")
        result = common.run_worker("whole_image.py", {**base, "options": options, "save": save})
        out[name] = {
            "options": options,
            "time_s": result["median_s"],
            "peak_mib": result["peak_mib"],
            "speedup": exact_seconds / result["median_s"],
            "psnr_db": psnr(np.load(save), reference),
        }
    return out


def main(argv: list[str]) -> dict[str, Any]:
    with common.busy_core(argv) as busy:
        return measure_all(argv, busy)


def measure_all(argv: list[str], busy: bool) -> dict[str, Any]:
    spec = common.spec_from_argv(argv)
    folder, _ = common.build_model(spec)
    payload: dict[str, Any] = {}
    if "--speedups-only" in argv:  # against the exact image and time of the last comparison, or a new exact run
        previous = common.RESULTS_DIR / f"whole_image-{spec.name}.json"
        if previous.exists() and reference_path(spec).exists():
            last = json.loads(previous.read_text())
        else:
            base = {"spec": spec.name, "folder": str(folder), "size": spec.image_size, "steps": spec.steps}
            exact = common.run_worker("whole_image.py", {**base, "impl": "ldm", "save": str(reference_path(spec))})
            last = {"ldm": {"time_s": exact["median_s"], "peak_mib": exact["peak_mib"], "runs": [exact]}}
        with tempfile.TemporaryDirectory() as tmp:
            last["speedups"] = speedups(spec, folder, Path(tmp), last["ldm"]["time_s"])
        common.save_results("whole_image", spec, {k: v for k, v in last.items() if k in RESULT_KEYS})
        for name, s in last["speedups"].items():
            print(f"  {name}: {s['time_s']:.1f} s, {s['speedup']:.2f}x, PSNR {s['psnr_db']:.1f} dB")
        return last
    with tempfile.TemporaryDirectory() as tmp:
        by_steps = {steps: compare(spec, folder, steps, Path(tmp)) for steps in sorted({*spec.plot_steps, spec.steps})}
        payload["by_steps"] = by_steps
        payload.update(by_steps[spec.steps])
        reference_path(spec).write_bytes((Path(tmp) / f"ldm-{spec.steps}.npy").read_bytes())
        payload["one_shot"] = compare_one_shot(spec, folder, Path(tmp), payload["diffusers"]["peak_mib"])
        if "--speedups" in argv:
            payload["speedups"] = speedups(spec, folder, Path(tmp), payload["ldm"]["time_s"])
    if "--size" in argv:
        size = int(argv[argv.index("--size") + 1])
        large = {"spec": spec.name, "folder": str(folder), "size": size, "steps": spec.steps, "large": True}
        payload["large"] = {"size": size, **{impl: common.run_worker("whole_image.py", {**large, "impl": impl})
                                             for impl in ("ldm", "diffusers")}}  # fmt: skip
    payload["busy_core"] = busy  # another process kept one core busy throughout
    path = common.save_results("whole_image-busy" if busy else "whole_image", spec, payload)
    ours, theirs = payload["ldm"], payload["diffusers"]
    print(
        f"Whole image ({spec.image_size}px, {spec.steps} steps): ldm {ours['time_s']:.1f} s / {ours['peak_mib']:.0f} MiB, "
        f"diffusers {theirs['time_s']:.1f} s / {theirs['peak_mib']:.0f} MiB; ratios time {payload['time_ratio']:.3f}, "
        f"peak {payload['peak_ratio']:.3f}; PSNR ldm vs diffusers {payload['psnr_ldm_vs_diffusers_db']:.1f} dB -> {path}"
    )
    one = payload["one_shot"]
    print(
        f"  one-shot ldm txt2img process: {one['time_s']:.1f} s (imports and load included) / {one['peak_mib']:.0f} MiB, "
        f"peak ratio {one['peak_ratio']:.3f}; PNG equals the reusable pipeline's image: {one['png_equals_reusable_pipeline_image']}"
    )
    for name, s in payload.get("speedups", {}).items():
        print(f"  {name}: {s['time_s']:.1f} s, {s['speedup']:.2f}x, PSNR {s['psnr_db']:.1f} dB")
    return payload


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main(sys.argv[1:])
