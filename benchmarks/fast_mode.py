"""Fast mode (LCM-LoRA, 4 ``lcm`` steps, guidance 1, TAESD, bf16) against the standard recipe, diffusers
and OpenVINO, and against its own FLOP floor.

    python benchmarks/fast_mode.py            # SD 1.5 architecture at full size, 512x512
    python benchmarks/fast_mode.py --quick    # the quick spec (~1/5 width, 256x256): a few minutes
    python benchmarks/fast_mode.py --openvino-python /path/to/venv/bin/python   # also the OpenVINO row

The model has random weights (``common.build_model``); beside it, built once in the same cache: a random
LoRA file shaped like lcm-lora-sdv1-5 (rank 64 on every Linear and Conv2d of the U-Net: attention and
feed-forward projections, ResNet convs and shortcuts, time embedding, proj_in/out, down- and
upsamplers; a few layers more than the published file covers) in diffusers' peft layout, which both
``ldm.adapters`` and diffusers' ``load_lora_weights`` read; and a random full-size TAESD
(``diffusers.AutoencoderTiny()`` defaults, a folder).

Each configuration runs in its own process (``common.run_worker``): load, one warm-up image, then
``spec.repeats`` timed images; the median and the peak resident memory of the timed images are kept.

- ``ldm-standard-fp32``: 20 DPM-Solver++ steps, guidance 7.5 with a negative prompt, KL decoder.
- ``ldm-fast-bf16`` / ``ldm-fast-fp32``: the LoRA fused (``pipe.load_lora(path, 1.0, fuse=True)``),
  ``lcm`` 4 steps, guidance 1, TAESD (``vae=``); fp32 separates the recipe's gain from the dtype's.
- ``diffusers-fast-bf16`` / ``diffusers-fast-fp32``: the same recipe in diffusers (``LCMScheduler``,
  ``load_lora_weights`` + ``fuse_lora``, ``AutoencoderTiny``, ``torch_dtype``). The fp32 images of the two
  engines, from the same seed, are compared (max |diff|, PSNR).
- ``openvino-fast-bf16`` (only with ``--openvino-python``): optimum-intel's pipeline exported from a
  diffusers folder with the LoRA fused and TAESD as its VAE; the export is timed apart. optimum-intel
  needs another transformers than ldm's environment, so it runs in its own virtual environment
  (docs/performance.md, "Fast mode").

The FLOP floor: the fast image's FLOPs (text encoder once, 4 U-Net steps at batch 1, the TAESD decode;
``common.count_flops`` on meta-device copies) over the machine's bf16 matrix-multiply rate, timed in the
same run before and after the images (the higher is used). The CPU model and its AVX-512 / AMX / bf16
flags are in the JSON (``cpu``), since the bf16 speed depends on them.
"""

from __future__ import annotations

import dataclasses

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STANDARD = {"scheduler": "dpm-solver++", "steps": 20, "guidance": common.GUIDANCE}
FAST = {"scheduler": "lcm", "steps": 4, "guidance": 1.0}
LORA_RANK = 64
SEED = 0
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TARGETS = {
    "fast_over_standard": 0.08,  # on a CPU with AMX
    "ldm_over_diffusers": 0.6,
    "time_over_flop_floor": 1.5,
    "ldm_over_openvino": 1.0,
}


# --- the model's companions: a LoRA shaped like LCM-LoRA and a TAESD ----------------------------------------


def asset_paths(spec: common.ModelSpec) -> dict[str, Path]:
    folder, _ = common.model_paths(spec)
    root = folder.parent
    return {"folder": folder, "lora": root / "lcm-lora-shaped.safetensors", "taesd": root / "taesd",
            "fused": root / "fast-fused-diffusers", "openvino": root / "fast-openvino"}  # fmt: skip


def build_assets(spec: common.ModelSpec) -> dict[str, Path]:
    common.build_model(spec)
    paths = asset_paths(spec)
    if not paths["lora"].exists():
        write_lora(paths["folder"], paths["lora"])
    if not (paths["taesd"] / "config.json").exists():
        from diffusers import AutoencoderTiny

        torch.manual_seed(0)
        tmp = paths["taesd"].with_name("taesd.partial")
        AutoencoderTiny().save_pretrained(tmp)
        tmp.rename(paths["taesd"])
    return paths


def write_lora(folder: Path, path: Path) -> None:
    """Random rank-64 LoRA on every Linear and Conv2d of the U-Net, diffusers' peft layout (alpha = rank).

    lcm-lora-sdv1-5 adapts the attention projections, feed-forward layers, ResNet convs, shortcuts
    and time projections, proj_in/out and the samplers' convs (in kohya's layout, fp16:
    scripts/lcm_lora_layout.py); taking the U-Net's own module list covers them all (and
    conv_in/conv_out and the time embedding besides). ``up`` is small so the update stays a
    perturbation of the weight.
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    generator = torch.Generator().manual_seed(1)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear):
            down_shape, up_shape = (LORA_RANK, module.in_features), (module.out_features, LORA_RANK)
        elif isinstance(module, torch.nn.Conv2d):
            down_shape = (LORA_RANK, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, LORA_RANK, 1, 1)
        else:
            continue
        fan_in = math.prod(down_shape[1:])
        state[f"unet.{name}.lora_A.weight"] = torch.randn(down_shape, generator=generator) / math.sqrt(fan_in)
        state[f"unet.{name}.lora_B.weight"] = torch.randn(up_shape, generator=generator) * (0.1 / LORA_RANK)
    tmp = path.with_name(path.name + ".partial")
    save_file(state, tmp)
    tmp.rename(path)


# --- the workers ------------------------------------------------------------------------------------------


def ldm_generate(args: dict[str, Any]):
    from ldm import Pipeline

    dtype = DTYPES[args["dtype"]]
    if args["recipe"] == "standard":
        pipe, recipe, negative = Pipeline.from_pretrained(args["folder"], dtype=dtype), STANDARD, common.NEGATIVE
    else:
        pipe, recipe, negative = Pipeline.from_pretrained(args["folder"], dtype=dtype, vae=args["taesd"]), FAST, None
        pipe.load_lora(args["lora"], 1.0, fuse=True)

    def generate(steps: int) -> np.ndarray:
        return pipe(common.PROMPT, negative_prompt=negative, num_inference_steps=steps,
                    guidance_scale=recipe["guidance"], height=args["size"], width=args["size"],
                    scheduler=recipe["scheduler"], seed=SEED, output_type="np").images  # fmt: skip

    return generate, recipe["steps"]


def diffusers_generate(args: dict[str, Any]):
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline

    dtype = DTYPES[args["dtype"]]
    pipe = StableDiffusionPipeline.from_pretrained(args["folder"], torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.vae = AutoencoderTiny.from_pretrained(args["taesd"], torch_dtype=dtype)
    pipe.load_lora_weights(args["lora"])
    pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)

    def generate(steps: int) -> np.ndarray:
        return pipe(common.PROMPT, num_inference_steps=steps, guidance_scale=FAST["guidance"],
                    height=args["size"], width=args["size"], generator=torch.Generator().manual_seed(SEED),
                    output_type="np").images  # fmt: skip

    return generate, FAST["steps"]


def openvino_generate(args: dict[str, Any]):
    """optimum-intel's pipeline for the text encoder and the 4 U-Net steps, exported once from the fused
    folder (the export timed apart), and TAESD's decoder converted with ``openvino.convert_model``:
    optimum's exporter reads a KL-VAE's ``latent_dist`` and cannot export ``AutoencoderTiny``."""
    import openvino
    from diffusers import AutoencoderTiny
    from optimum.intel import OVStableDiffusionPipeline

    exported, side = Path(args["openvino"]), args["size"] // 8
    export_s = None
    if not (exported / "model_index.json").exists():
        start = time.perf_counter()
        OVStableDiffusionPipeline.from_pretrained(args["fused"], export=True, compile=False).save_pretrained(exported)
        export_s = time.perf_counter() - start
    config = {"INFERENCE_PRECISION_HINT": {"bf16": "bf16", "fp32": "f32"}[args["dtype"]],
              "INFERENCE_NUM_THREADS": str(common.THREADS)}  # fmt: skip
    start = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(exported, ov_config=config)
    pipe.compile()
    taesd = AutoencoderTiny.from_pretrained(args["taesd"])
    decoder_ir = openvino.convert_model(taesd.decoder, example_input=torch.zeros(1, 4, side, side))
    decoder = openvino.Core().compile_model(decoder_ir, "CPU", config)
    compile_s = time.perf_counter() - start

    def generate(steps: int) -> np.ndarray:
        latents = pipe(common.PROMPT, num_inference_steps=steps, guidance_scale=FAST["guidance"],
                       height=args["size"], width=args["size"], generator=np.random.RandomState(SEED),
                       output_type="latent").images  # fmt: skip
        pixels = decoder(np.asarray(latents, dtype=np.float32) / taesd.config.scaling_factor)[0]
        return np.clip(pixels / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)  # as diffusers' image processor

    generate.extra = {"export_s": export_s, "load_compile_s": compile_s}
    return generate, FAST["steps"]


def run(args: dict[str, Any]) -> dict[str, Any]:
    if args["impl"] == "gemm":
        return {"bf16_gflops": bf16_matmul_rate(), "fp32_gflops": common.matmul_rate()}
    if args["impl"] == "flops":
        return count_fast_flops(args)
    makers = {"ldm": ldm_generate, "diffusers": diffusers_generate, "openvino": openvino_generate}
    generate, steps = makers[args["impl"]](args)
    images = []
    with torch.inference_mode():
        result = common.measure(lambda: images.append(generate(steps)), warmup=1, repeats=args["repeats"])
    if args.get("save"):
        np.save(args["save"], np.asarray(images[-1], dtype=np.float32))
    return {**result, **getattr(generate, "extra", {})}


# --- the FLOP floor ---------------------------------------------------------------------------------------


def bf16_matmul_rate(n: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of an n^3 bf16 matrix product, the faster of ``torch.mm`` and the same product as a 1x1
    convolution (oneDNN), as ``common.matmul_rate`` does in fp32."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    rows = a.view(1, n, 1, n).permute(0, 3, 1, 2)
    weight = b.t().contiguous()[:, :, None, None]
    products = (lambda: torch.mm(a, b), lambda: torch.nn.functional.conv2d(rows, weight))
    best = min(common.measure(product, warmup=1, repeats=repeats)["median_s"] for product in products)
    return 2 * n**3 / best / 1e9


def count_fast_flops(args: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one fast image on meta-device copies: the text encoder once, a U-Net step at batch 1
    (guidance 1: one call per step) times the steps, the TAESD decode."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder, side = Path(args["folder"]), args["size"] // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        taesd = AutoencoderTiny.from_config(AutoencoderTiny.load_config(args["taesd"]))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        ids = torch.zeros(1, 77, dtype=torch.long)
        states = torch.zeros(1, 77, unet.config.cross_attention_dim)
        latents = torch.zeros(1, 4, side, side)
        t = torch.tensor([500])
        text_flops = common.count_flops(lambda: text(ids))
        step_flops = common.count_flops(lambda: unet(latents, t, states))
        decode_flops = common.count_flops(lambda: taesd.decode(latents))
    total = text_flops + FAST["steps"] * step_flops + decode_flops
    return {"text_encoder": text_flops, "unet_step": step_flops, "taesd_decode": decode_flops, "total": total}


# --- the orchestrator -------------------------------------------------------------------------------------


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def write_fused_folder(paths: dict[str, Path]) -> None:
    """The fast model as one diffusers folder (LoRA fused, LCMScheduler) for OpenVINO's export; it keeps the
    KL-VAE, which optimum's exporter needs (the worker converts TAESD's decoder itself)."""
    if (paths["fused"] / "model_index.json").exists():
        return
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(paths["folder"], safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(paths["lora"])
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    tmp = paths["fused"].with_name(paths["fused"].name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(paths["fused"])


def main(argv: list[str]) -> dict[str, Any]:
    from ldm.kernels.choice import kernel_choice

    spec = common.spec_from_argv(argv)
    paths = build_assets(spec)
    base = {key: str(value) for key, value in paths.items()} | {"size": spec.image_size, "repeats": spec.repeats}
    tmp = common.CACHE_DIR / (spec.model or spec.name) / "fast-mode-images"
    tmp.mkdir(exist_ok=True)
    configs = {
        "ldm-standard-fp32": {"impl": "ldm", "recipe": "standard", "dtype": "fp32"},
        "ldm-fast-bf16": {"impl": "ldm", "recipe": "fast", "dtype": "bf16"},
        "diffusers-fast-bf16": {"impl": "diffusers", "recipe": "fast", "dtype": "bf16"},
        "ldm-fast-fp32": {"impl": "ldm", "recipe": "fast", "dtype": "fp32"},
        "diffusers-fast-fp32": {"impl": "diffusers", "recipe": "fast", "dtype": "fp32"},
    }
    gemm = [common.run_worker("fast_mode.py", {"impl": "gemm"})]
    flops = common.run_worker("fast_mode.py", {**base, "impl": "flops"})
    runs: dict[str, Any] = {}
    for name, config in configs.items():
        print(f"  {name} ...", flush=True)
        runs[name] = common.run_worker("fast_mode.py", {**base, **config, "save": str(tmp / f"{name}.npy")})
    openvino_python = argv[argv.index("--openvino-python") + 1] if "--openvino-python" in argv else None
    if openvino_python:
        write_fused_folder(paths)
        config = {**base, "impl": "openvino", "recipe": "fast", "dtype": "bf16",
                  "save": str(tmp / "openvino-fast-bf16.npy")}  # fmt: skip
        try:
            runs["openvino-fast-bf16"] = common.run_worker("fast_mode.py", config, python=openvino_python)
        except RuntimeError as error:
            runs["openvino-fast-bf16"] = {"error": str(error)[-1500:]}
    gemm.append(common.run_worker("fast_mode.py", {"impl": "gemm"}))

    images = {name: np.load(tmp / f"{name}.npy") for name in runs if (tmp / f"{name}.npy").exists()}
    bf16_rate = max(g["bf16_gflops"] for g in gemm)
    floor_s = flops["total"] / (bf16_rate * 1e9)
    fast, standard, theirs = runs["ldm-fast-bf16"], runs["ldm-standard-fp32"], runs["diffusers-fast-bf16"]
    payload: dict[str, Any] = {
        "configs": runs,
        "gemm": gemm,
        "bf16_gemm_gflops": bf16_rate,
        "fp32_gemm_gflops": max(g["fp32_gflops"] for g in gemm),
        "fast_image_flops": flops,
        "flop_floor_s": floor_s,
        "ratios": {
            "fast_over_standard": fast["median_s"] / standard["median_s"],
            "fast_fp32_over_standard": runs["ldm-fast-fp32"]["median_s"] / standard["median_s"],
            "fast_bf16_over_fast_fp32": fast["median_s"] / runs["ldm-fast-fp32"]["median_s"],
            "ldm_over_diffusers": fast["median_s"] / theirs["median_s"],
            "ldm_over_diffusers_fp32": runs["ldm-fast-fp32"]["median_s"] / runs["diffusers-fast-fp32"]["median_s"],
            "time_over_flop_floor": fast["median_s"] / floor_s,
            "peak_ldm_over_diffusers": fast["peak_mib"] / theirs["peak_mib"],
        },
        "targets": TARGETS,
        "agreement_fp32": {
            "max_abs_diff": float(np.abs(images["ldm-fast-fp32"] - images["diffusers-fast-fp32"]).max()),
            "psnr_db": psnr(images["ldm-fast-fp32"], images["diffusers-fast-fp32"]),
        },
        "agreement_bf16_psnr_db": psnr(images["ldm-fast-bf16"], images["diffusers-fast-bf16"]),
        "bf16_against_fp32": {  # what bf16 costs in fidelity: ldm's fast image, same seed, bf16 against fp32
            "max_abs_diff": float(np.abs(images["ldm-fast-bf16"] - images["ldm-fast-fp32"]).max()),
            "psnr_db": psnr(images["ldm-fast-bf16"], images["ldm-fast-fp32"]),
        },
        "kernels": {dtype: dataclasses.asdict(kernel_choice(torch.device("cpu"), getattr(torch, dtype)))
                    for dtype in ("float32", "bfloat16")},  # fmt: skip
    }
    openvino = runs.get("openvino-fast-bf16")
    if openvino and "median_s" in openvino:
        payload["ratios"]["ldm_over_openvino"] = fast["median_s"] / openvino["median_s"]
        payload["openvino_export_s"] = openvino["export_s"]
    elif not openvino:
        payload["openvino"] = "not run: pass --openvino-python (see docs/performance.md, Fast mode)"
    path = common.save_results("fast_mode", spec, payload)
    report(spec, payload, path)
    return payload


def report(spec: common.ModelSpec, payload: dict[str, Any], path: Path) -> None:
    print(f"Fast mode ({spec.name}, {spec.image_size}px) on {common.cpu_info()['model']}:")
    for name, run_ in payload["configs"].items():
        if "median_s" in run_:
            print(f"  {name:22s} {run_['median_s']:7.2f} s   peak RSS {run_['peak_mib']:6.0f} MiB")
        else:
            reasons = [line for line in run_["error"].splitlines() if "Error" in line or line.startswith("'")]
            print(f"  {name:22s} failed: {' '.join(reasons[-3:])}")
    flops = payload["fast_image_flops"]
    print(f"  fast image {flops['total'] / 1e12:.3f} TFLOP; bf16 GEMM {payload['bf16_gemm_gflops']:.0f} GFLOP/s "
          f"(fp32 {payload['fp32_gemm_gflops']:.0f}); floor {payload['flop_floor_s']:.2f} s")  # fmt: skip
    for key, value in payload["ratios"].items():
        target = TARGETS.get(key)
        print(f"  {key:26s} {value:6.3f}" + (f"   target <= {target}" if target else ""))
    if payload.get("openvino_export_s") is not None:
        print(f"  OpenVINO export (apart, once): {payload['openvino_export_s']:.1f} s")
    agree = payload["agreement_fp32"]
    print(f"  ldm vs diffusers, fast fp32: max |diff| {agree['max_abs_diff']:.2e}, PSNR {agree['psnr_db']:.1f} dB; "
          f"bf16 PSNR {payload['agreement_bf16_psnr_db']:.1f} dB -> {path}")  # fmt: skip
    own = payload["bf16_against_fp32"]
    print(f"  ldm fast bf16 against fp32, same seed: max |diff| {own['max_abs_diff']:.3f}, PSNR {own['psnr_db']:.1f} dB; "
          f"kernels {payload['kernels']}")  # fmt: skip


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main(sys.argv[1:])
