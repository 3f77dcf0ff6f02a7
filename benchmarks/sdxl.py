"""SDXL base at full size: load time, seconds per guided step and peak memory at 1024x1024, ldm against diffusers.

    python benchmarks/sdxl.py [--quick] [--dtype fp32,bf16] [--file-dtype same|fp16] [--rounds 2] [--cache DIR]

Writes once, to ``$LDM_BENCH_CACHE/sdxl`` (default ``$TMPDIR/ldm-bench-models/sdxl``), a random-weight
SDXL 1.0 base of the full architecture (U-Net 2.57 G parameters, CLIP ViT-L and OpenCLIP bigG, the SDXL
VAE) as one original-layout (Stability) ``.safetensors`` written by ldm's own writer, and a diffusers
config-only folder (component configs, both tokenizers from ldm's shipped assets) with which
``StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True)`` loads it offline.
By default the file holds the weights in the dtype they are run in (``--file-dtype same``: 13.9 GB in
fp32, 7 GB in bf16), so that a loader can use the file's bytes in place; ``--file-dtype fp16`` writes one
fp16 file (as the released ``sd_xl_base_1.0.safetensors``), converted by both engines while loading.

For each dtype, each engine runs in fresh processes, alternated (ABBA over ``--rounds``):

- **load**: the load call, and the time until every weight is paged in (ldm's weights may be lazy views
  of the memory-mapped file), with the peak resident memory of the load (``load.py``'s method);
- **image**: one guided 1024x1024 image, batch 1, guidance 7.5 with a negative prompt, Euler (SDXL's
  scheduler) over ``STEPS`` steps from the same initial latents, each engine's default decoder path. The
  first step warms up; the second is the step that is timed (from one step callback to the next). The
  peak is the process's resident high-water mark over load, text encoding, both steps and the VAE decode
  (reset after the imports), also read after each stage to show where it was reached.

The images of the two engines are compared (PSNR). Results: ``results/sdxl-<dtype>.json`` (``--quick``:
``sdxl-quick-<dtype>.json``) and a table. ``--quick`` runs a scaled-down SDXL-shaped model at 256x256.
Full size needs about 20 GiB of free memory in fp32; never run two at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import load  # noqa: E402
from whole_image import psnr  # noqa: E402

STEPS = 2  # one warm-up step, one timed step: the fewest that give a warm measurement
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = {"load": 0.3, "step": 0.8, "peak": 0.75}  # ldm / diffusers, issue 20


@dataclass(frozen=True)
class SdxlSpec:
    """The model size and image size of a run; ``name`` names the results file."""

    name: str
    full_size: bool
    image_size: int
    dtype: str
    file_dtype: str
    steps: int = STEPS


# --- the model -------------------------------------------------------------------------------------


def configs(full_size: bool) -> SimpleNamespace:
    """The networks' configurations: SDXL 1.0 base's, or the same structure at about 2/5 of the width."""
    from ldm.loading.single_file import release_scheduler
    from ldm.models import UNetConfig, VAEConfig
    from ldm.models.text_encoder import clip_config, clip_config_2

    text, text_2 = clip_config("sdxl"), clip_config_2("sdxl")
    scheduler = release_scheduler("sdxl", "epsilon")
    if full_size:
        return SimpleNamespace(unet=UNetConfig.sdxl(), vae=VAEConfig.sdxl(), text=text, text_2=text_2, scheduler=scheduler)
    # SDXL's conventions (64-wide heads, 32 groups, 256-wide micro-conditioning, no attention at the top level).
    text.update(dict(hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_hidden_layers=4))
    text_2.update(dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=4, projection_dim=512))
    unet = UNetConfig(
        block_out_channels=(128, 256, 512), cross_attention_levels=(False, True, True), num_attention_heads=(2, 4, 8),
        cross_attention_dim=384 + 512, use_linear_projection=True, sample_size=32, transformer_layers_per_block=(1, 2, 4),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=512 + 6 * 256,
    )  # fmt: skip
    vae = VAEConfig(block_out_channels=(64, 128, 256, 256), scaling_factor=0.13025, sample_size=256, force_upcast=True)
    return SimpleNamespace(unet=unet, vae=vae, text=text, text_2=text_2, scheduler=scheduler)


def model_paths(cache: Path, full_size: bool, file_dtype: str) -> tuple[Path, Path]:
    """(single file, diffusers config folder) in the cache."""
    name = "sdxl-base" if full_size else "sdxl-quick"
    return cache / f"{name}-{file_dtype}.safetensors", cache / f"{name}-config"


def write_model(cache: Path, full_size: bool, file_dtype: str) -> tuple[Path, Path]:
    """The random-weight single file and the diffusers config-only folder, each written once."""
    path, folder = model_paths(cache, full_size, file_dtype)
    parts = configs(full_size)
    if not folder.exists():
        write_config_folder(folder, parts)
    if not path.exists():
        write_random_file(path, parts, DTYPES[file_dtype], full_size)
    return path, folder


def write_config_folder(folder: Path, parts: SimpleNamespace) -> None:
    """What ``from_single_file(config=...)`` reads: model_index.json, each component's config, both tokenizers."""
    from ldm.io import atomic_write_dir
    from ldm.models.text_encoder import load_tokenizer, load_tokenizer_2

    def write(tmp: Path) -> None:
        index = {
            "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"], "image_encoder": [None, None], "feature_extractor": [None, None],
        }  # fmt: skip
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        for sub, config in (("unet", parts.unet.to_diffusers()), ("vae", parts.vae.to_diffusers())):
            (tmp / sub).mkdir()
            (tmp / sub / "config.json").write_text(json.dumps(config, indent=2))
        for sub, text, architecture in (("text_encoder", parts.text, "CLIPTextModel"), ("text_encoder_2", parts.text_2, "CLIPTextModelWithProjection")):
            (tmp / sub).mkdir()
            text.architectures = [architecture]
            text.to_json_file(tmp / sub / "config.json")
        load_tokenizer("sdxl").save_pretrained(tmp / "tokenizer")
        load_tokenizer_2("sdxl").save_pretrained(tmp / "tokenizer_2")
        (tmp / "scheduler").mkdir()
        scheduler = {**parts.scheduler.to_diffusers(), "_class_name": "EulerDiscreteScheduler"}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))

    atomic_write_dir(folder, write)


def write_random_file(path: Path, parts: SimpleNamespace, dtype: torch.dtype, full_size: bool) -> None:
    """Build the networks on the meta device and stream their original-layout tensors to ``path``, each drawn
    when it is written (N(0, 0.02): activations stay finite through 70 transformer blocks): no copy of the
    model is ever held in memory."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ldm.io import atomic_write
    from ldm.loading.configs import ModelConfigs, networks_of, to_metadata
    from ldm.loading.single_file import single_file_state
    from ldm.loading.writers import write_safetensors_streamed
    from ldm.models import AutoencoderKL, UNet

    with torch.device("meta"):
        models = SimpleNamespace(
            unet=UNet(parts.unet), vae=AutoencoderKL(parts.vae), text_encoder=CLIPTextModel(parts.text),
            text_encoder_2=CLIPTextModelWithProjection(parts.text_2), family="sdxl", scheduler_config=parts.scheduler,
        )  # fmt: skip
    state = single_file_state(models)
    specs = {key: t.to(dtype) if t.is_floating_point() else t for key, t in state.items()}
    specs = {key: torch.empty(t.shape, dtype=t.dtype, device="meta") for key, t in specs.items()}
    generator = torch.Generator().manual_seed(0)

    def produce(key: str) -> torch.Tensor:
        spec = specs[key]
        if spec.is_floating_point():
            return torch.empty(spec.shape).normal_(0.0, 0.02, generator=generator).to(dtype)
        return torch.arange(spec.shape[-1]).expand(spec.shape).contiguous().to(spec.dtype)  # CLIP's position ids

    # The full-size file carries no configuration, as the released one: both engines detect SDXL base from its
    # keys and shapes. The quick model's sizes are not SDXL's, so it says what they are.
    metadata = {"format": "pt", "modelspec.prediction_type": "epsilon"}
    if not full_size:
        configs_ = ModelConfigs(parts.unet, parts.vae, parts.text, parts.scheduler, {}, parts.text_2)
        metadata.update(to_metadata(configs_, networks_of("sdxl")))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: write_safetensors_streamed(tmp, specs, produce, metadata))


# --- inside a worker process -------------------------------------------------------------------------


def loader(impl: str, path: str, folder: str, dtype: torch.dtype):
    """A function that loads the model with ``impl``; the imports done here, outside the timed load. As in
    ``load.py``, transformers' CLIP model code is imported for both (diffusers' pipeline import brings it in)."""
    if impl == "ldm":
        import transformers.models.clip.modeling_clip  # noqa: F401

        from ldm import Pipeline

        return lambda: Pipeline.from_pretrained(path, dtype=dtype)
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    def load_diffusers():
        pipe = StableDiffusionXLPipeline.from_single_file(
            path, config=folder, local_files_only=True, torch_dtype=dtype, add_watermarker=False
        )
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load_diffusers


def networks(pipe) -> tuple:
    return pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2


def load_run(args: dict[str, Any]) -> dict[str, Any]:
    """Load, then page in every weight: the seconds of each and the peak resident memory of the load."""
    make = loader(args["impl"], args["path"], args["folder"], DTYPES[args["dtype"]])
    before = common.rss_mib()
    common.reset_peak()
    start = time.perf_counter()
    pipe = make()
    seconds = time.perf_counter() - start
    checksum = load.touch_weights(networks(pipe))
    ready = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for m in networks(pipe) for p in m.parameters()) / 2**20
    return {"load_s": seconds, "ready_s": ready, "peak_mib": common.peak_mib(), "rss_before_mib": before,
            "weights_mib": weights, "checksum": checksum}  # fmt: skip


class Clock:
    """Seconds since the start, resident memory and its high-water mark at each mark of one generation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: list[dict[str, float]] = []

    def mark(self, what: str) -> None:
        self.marks.append({"what": what, "s": time.perf_counter() - self.start, "rss_mib": common.rss_mib(),
                           "peak_mib": common.peak_mib()})  # fmt: skip

    def at(self, what: str) -> float:
        return next(m["s"] for m in self.marks if m["what"] == what)


def image_run(args: dict[str, Any]) -> dict[str, Any]:
    """Load, then one guided image: the timed step, the other stages' seconds and the peak over all of it."""
    impl, dtype, size, steps = args["impl"], DTYPES[args["dtype"]], args["size"], args["steps"]
    make = loader(impl, args["path"], args["folder"], dtype)
    # Latents drawn in fp32, rounded to the run's dtype (diffusers' U-Net takes them in it), the same for both.
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    rss_imports = common.rss_mib()
    common.reset_peak()
    clock = Clock()
    pipe = make()
    clock.mark("load")
    options = dict(negative_prompt=common.NEGATIVE, num_inference_steps=steps, guidance_scale=common.GUIDANCE,
                   height=size, width=size, output_type="np")  # fmt: skip
    if impl == "ldm":
        step_done = lambda i, t, x, denoised: clock.mark(f"step {i}")  # noqa: E731
        images = pipe(common.PROMPT, latents=latents.float(), scheduler="euler", callback=step_done, **options).images
    else:

        def step_done(pipe, i, t, tensors):
            clock.mark(f"step {i}")
            return tensors

        images = pipe(common.PROMPT, latents=latents, callback_on_step_end=step_done, **options).images
    clock.mark("decoded")
    np.save(args["save"].format(impl=impl), np.asarray(images, dtype=np.float32))
    last = f"step {steps - 1}"
    return {
        "step_s": clock.at(last) - clock.at(f"step {steps - 2}"),
        "load_s": clock.at("load"),
        "encode_and_first_step_s": clock.at("step 0") - clock.at("load"),
        "decode_s": clock.at("decoded") - clock.at(last),
        "total_s": clock.at("decoded"),
        "peak_mib": common.peak_mib(),
        "rss_after_imports_mib": rss_imports,
        "marks": clock.marks,
    }


def run(args: dict[str, Any]) -> dict[str, Any]:
    return {"load": load_run, "image": image_run}[args["part"]](args)


# --- the orchestrator ---------------------------------------------------------------------------------


def available_gib() -> float:
    return common.available_bytes() / 2**30


def wait_for_memory(gib: float, patience_s: float = 1800) -> None:
    """Wait until ``gib`` of memory is available (others may be using the machine); give up after ``patience_s``."""
    deadline = time.monotonic() + patience_s
    while available_gib() < gib:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {available_gib():.1f} GiB of memory available, {gib:.0f} needed; try again later")
        print(f"  waiting: {available_gib():.1f} GiB available, {gib:.0f} GiB needed", flush=True)
        time.sleep(30)


def needed_gib(spec: SdxlSpec) -> float:
    """Free memory a worker needs: the weights in the run's dtype, once, and room for the 1024x1024 decode."""
    if not spec.full_size:
        return 2
    return 13 + 6 if spec.dtype == "fp32" else 7 + 5


def measure_dtype(spec: SdxlSpec, path: Path, folder: Path, rounds: int, tmp: Path) -> dict[str, Any]:
    """Load and image runs of both engines, alternated, and their summary."""
    from ldm.kernels.choice import kernel_choice

    # ldm's fast paths and memory formats measured now (cached), not in a timed load; recorded with the results
    kernels = dataclasses.asdict(kernel_choice(torch.device("cpu"), DTYPES[spec.dtype]))

    def before() -> None:
        wait_for_memory(needed_gib(spec))
        load.warm_page_cache(path)  # both engines read a file in the page cache, as a user's second run does

    base = {"path": str(path), "folder": str(folder), "dtype": spec.dtype, "size": spec.image_size, "steps": spec.steps}
    loads = common.alternate("sdxl.py", {**base, "part": "load"}, rounds, before=before)
    print(f"  load runs done ({spec.dtype})", flush=True)
    # Each round's image replaces the engine's last one.
    images = common.alternate("sdxl.py", {**base, "part": "image", "save": str(tmp / "{impl}.npy")}, rounds, before=before)
    summary = {impl: summarize(loads[impl], images[impl]) for impl in loads}
    ours, theirs = summary["ldm"], summary["diffusers"]
    ratios = {
        "load": common.ratio(ours["load_s"], theirs["load_s"]),
        "load_paged_in": common.ratio(ours["ready_s"], theirs["ready_s"]),
        "step": common.ratio(ours["step_s"], theirs["step_s"]),
        "peak": common.ratio(ours["peak_mib"], theirs["peak_mib"]),
        "decode": common.ratio(ours["decode_s"], theirs["decode_s"]),
    }
    saved = {impl: np.load(tmp / f"{impl}.npy") for impl in ("ldm", "diffusers")}
    return {
        **summary,
        "ratios": ratios,
        "ldm_kernels": kernels,
        "targets": {k: {"target": v, "met": bool(ratios[k] <= v)} for k, v in TARGETS.items()},
        "psnr_ldm_vs_diffusers_db": psnr(saved["ldm"], saved["diffusers"]),
        "image_finite": {impl: bool(np.isfinite(image).all()) for impl, image in saved.items()},
        "runs": {"load": loads, "image": images},
    }


def summarize(loads: list[dict], images: list[dict]) -> dict[str, Any]:
    """One engine: the best load of its rounds, the median of its timed steps and stages, the highest peaks."""
    median = lambda key: statistics.median(run_[key] for run_ in images)  # noqa: E731
    checksums = {round(run_["checksum"], 2) for run_ in loads}
    if len(checksums) != 1:
        raise SystemExit(f"the rounds loaded different weights: checksums {checksums}")
    return {
        "load_s": min(r["load_s"] for r in loads),
        "ready_s": min(r["ready_s"] for r in loads),
        "load_peak_mib": max(r["peak_mib"] for r in loads),
        "weights_mib": loads[0]["weights_mib"],
        "checksum": loads[0]["checksum"],
        "step_s": median("step_s"),
        "steps_s": [r["step_s"] for r in images],
        "encode_and_first_step_s": median("encode_and_first_step_s"),
        "decode_s": median("decode_s"),
        "total_s": median("total_s"),
        "peak_mib": max(r["peak_mib"] for r in images),
        "peak_by_stage_mib": max((r["marks"] for r in images), key=lambda m: m[-1]["peak_mib"]),
    }


ROWS = (
    ("load call (s)", "load_s", "load", "{:.2f}"),
    ("load, every weight paged in (s)", "ready_s", "load_paged_in", "{:.2f}"),
    ("load peak RSS (MiB)", "load_peak_mib", None, "{:.0f}"),
    ("weights in memory (MiB)", "weights_mib", None, "{:.0f}"),
    ("guided step, 2nd of 2 (s)", "step_s", "step", "{:.1f}"),
    ("text encoding + 1st step (s)", "encode_and_first_step_s", None, "{:.1f}"),
    ("VAE decode (s)", "decode_s", "decode", "{:.1f}"),
    ("whole run: load to pixels (s)", "total_s", None, "{:.1f}"),
    ("peak RSS, load to pixels (MiB)", "peak_mib", "peak", "{:.0f}"),
)


def table(result: dict[str, Any]) -> str:
    """The markdown table of one dtype's run."""
    lines = ["| measure | ldm | diffusers | ldm / diffusers | target |", "|---|---|---|---|---|"]
    targets = {"load": "load", "step": "step", "peak": "peak"}
    for label, key, ratio_key, fmt in ROWS:
        ratio = f"{result['ratios'][ratio_key]:.3f}" if ratio_key else ""
        target = ""
        if ratio_key in targets:
            t = result["targets"][targets[ratio_key]]
            target = f"<= {t['target']}: {'met' if t['met'] else 'not met'}"
        lines.append(f"| {label} | {fmt.format(result['ldm'][key])} | {fmt.format(result['diffusers'][key])} | {ratio} | {target} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a scaled-down SDXL-shaped model at 256x256")
    parser.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--file-dtype", choices=("same", "fp16"), default="same",
                        help="the weights on disk: in the run's dtype (default), or one fp16 file as released")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="processes per engine and part, alternated (ABBA)")
    parser.add_argument("--cache", type=Path, default=common.CACHE_DIR / "sdxl")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"  # the workers inherit it: diffusers reads the config folder only
    common.worker_setup()
    for dtype in args.dtype.split(","):
        if dtype not in ("fp32", "bf16"):
            raise SystemExit(f"--dtype: {dtype!r} is not fp32 or bf16")
        file_dtype = dtype if args.file_dtype == "same" else "fp16"
        spec = SdxlSpec(f"quick-{dtype}" if args.quick else dtype, not args.quick, 256 if args.quick else 1024, dtype, file_dtype)
        if args.file_dtype == "fp16":
            spec = SdxlSpec(f"{spec.name}-fp16-file", spec.full_size, spec.image_size, dtype, file_dtype)
        start = time.perf_counter()
        path, folder = write_model(args.cache, spec.full_size, file_dtype)
        print(f"{spec.name}: {path} ({path.stat().st_size / 2**20:.0f} MiB, {file_dtype}) ready after "
              f"{time.perf_counter() - start:.0f} s; running {args.rounds} round(s) per engine", flush=True)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            result = measure_dtype(spec, path, folder, args.rounds, Path(tmp))
        result["file"] = {"path": str(path), "mib": path.stat().st_size / 2**20, "dtype": file_dtype}
        saved = common.save_results("sdxl", spec, result)
        print(f"\nSDXL base, {spec.image_size}x{spec.image_size}, {dtype} ({file_dtype} file), {args.rounds} round(s):")
        print(table(result))
        print(f"images: PSNR ldm vs diffusers {result['psnr_ldm_vs_diffusers_db']:.1f} dB; finite {result['image_finite']} -> {saved}\n")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main()
