"""One classifier-free-guidance U-Net step (batch 2) of ldm against diffusers, and the FLOP rate it achieves.

    python benchmarks/unet_step.py [--quick] [--compile] [--busy-core]

Both engines load the same diffusers folder and run the same seeded guided step
(one latent (1, 4, h, w) for the unconditional and the conditional pass, timestep 500,
text states (2, 77, width)) under ``torch.inference_mode``, each called the way its
pipeline calls it: diffusers with the latent twice (``torch.cat([latents] * 2)``), ldm
with the latent once, shared by both text states until the first cross-attention.
The FLOPs of each engine's step are counted once with ``torch.utils.flop_counter``
(2 per multiply-add, matmuls, convolutions and attention); the achieved rate of
each engine is its own FLOPs over its time, against a large fp32 GEMM timed in the
same run. ldm variants (channels-last memory format, ``torch.compile``, every fast path or none of them
instead of the measured choice) are timed too, so whether they help on this machine is measured rather
than assumed. ``--busy-core`` runs it all
while another process keeps one of the cores busy (results in ``unet_step-busy-<spec>.json``).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TIMESTEP = 500


def step_inputs(spec: common.ModelSpec, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A guided step's inputs as ``impl``'s pipeline passes them: diffusers repeats the latent, ldm shares it."""
    g = torch.Generator().manual_seed(0)
    side = spec.image_size // 8
    latent = torch.randn(1, 4, side, side, generator=g)
    context = torch.randn(2, 77, spec.text_width, generator=g)
    return (latent if impl == "ldm" else torch.cat([latent] * 2)), torch.tensor(TIMESTEP), context


def load_unet(impl: str, folder: str, variant: str = "exact"):
    """A callable (sample, t, context) -> prediction; ``variant`` is an ldm option: exact, channels_last, compile,
    every_path, plain (the fast paths taken)."""
    if impl == "diffusers":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
        return lambda x, t, c: unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
    from ldm.kernels.choice import PLAIN, KernelChoice, kernel_choice
    from ldm.loading import load_components
    from ldm.models import set_kernels

    unet = load_components(folder).unet.eval()
    # The fast paths a pipeline takes here (measured on this CPU); "every_path" takes all of them, as ldm did
    # before they were measured per CPU; "plain" takes none (torch's own calls).
    kernels = {"every_path": KernelChoice(True, True, True, True), "plain": PLAIN}.get(variant)
    set_kernels(unet, kernels or kernel_choice(torch.device("cpu"), torch.float32))
    if variant == "channels_last":
        unet = unet.to(memory_format=torch.channels_last)
        return lambda x, t, c: unet(x.contiguous(memory_format=torch.channels_last), t, c)
    return torch.compile(unet) if variant == "compile" else unet


def run(args: dict[str, Any]) -> dict[str, Any]:
    spec = common.SPECS[args["spec"]]
    if args["impl"] == "matmul":
        return {"gflops": common.matmul_rate()}
    forward = load_unet(args["impl"], args["folder"], args.get("variant", "exact"))
    sample, t, context = step_inputs(spec, args["impl"])
    outputs = []

    def step() -> None:
        with torch.inference_mode():
            outputs.append(forward(sample, t, context))

    result = common.measure(step, warmup=1, repeats=spec.repeats)
    if args.get("save"):
        torch.save(outputs[-1].contiguous(), args["save"].format(impl=args["impl"]))
    return result


def count_step_flops(spec: common.ModelSpec, impl: str) -> int:
    """FLOPs of one guided step with ``impl``'s inputs, counted on a meta-device ldm U-Net of the spec's shape."""
    from ldm.models import UNet, UNetConfig

    cfg = UNetConfig(block_out_channels=spec.unet_widths, cross_attention_dim=spec.text_width)
    with torch.device("meta"):
        unet = UNet(cfg)
        sample, _, context = (x.to("meta") for x in step_inputs(spec, impl))
    # Sliced attention runs Q K^T and P V as plain matmuls, which the counter sees at any backend version.
    unet.set_attention("sliced")
    return common.count_flops(lambda: unet(sample, torch.tensor(TIMESTEP, device="meta"), context))


def main(argv: list[str]) -> dict[str, Any]:
    with common.busy_core(argv) as busy:
        return measure_all(argv, busy)


def measure_all(argv: list[str], busy: bool) -> dict[str, Any]:
    from ldm.kernels.choice import kernel_choice

    spec = common.spec_from_argv(argv)
    folder, _ = common.build_model(spec)
    rounds = 2  # ABBA: a slow spell of the shared CPU hits both engines (one full-size round was +-10 % noisy)
    base = {"spec": "quick" if spec is common.QUICK else "full", "folder": str(folder)}
    flops = {impl: count_step_flops(spec, impl) for impl in ("ldm", "diffusers")}
    gemm = common.run_worker("unet_step.py", {**base, "impl": "matmul"})["gflops"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = common.alternate("unet_step.py", {**base, "save": str(Path(tmp) / "{impl}.pt")}, rounds)
        max_diff = (torch.load(Path(tmp) / "ldm.pt") - torch.load(Path(tmp) / "diffusers.pt")).abs().max().item()
    variants = {}
    # torch.compile of the full-size U-Net takes many minutes on 2 cores: measured with --compile only.
    for variant in ("channels_last", "every_path", "plain") + (("compile",) if "--compile" in argv else ()):
        try:
            variants[variant] = common.run_worker("unet_step.py", {**base, "impl": "ldm", "variant": variant})
        except RuntimeError as error:  # e.g. no C++ compiler for torch.compile: recorded, not fatal
            lines = [line for line in str(error).splitlines() if line.strip()]
            variants[variant] = {"error": lines[-1] if lines else "failed"}
    gemm_after = common.run_worker("unet_step.py", {**base, "impl": "matmul"})["gflops"]
    t_ldm, t_diff = common.pooled(runs["ldm"]), common.pooled(runs["diffusers"])
    rate = max(gemm, gemm_after)
    payload = {
        "flops": flops["diffusers"],  # a guided step computed in full
        "ldm_flops": flops["ldm"],  # what ldm computes, sharing the latent up to the first cross-attention
        "matmul_gflops": [gemm, gemm_after],
        "ldm": {"median_s": t_ldm, "peak_mib": common.max_of(runs["ldm"], "peak_mib"), "runs": runs["ldm"],
                "gflops": flops["ldm"] / t_ldm / 1e9, "fraction_of_matmul": flops["ldm"] / t_ldm / 1e9 / rate},
        "diffusers": {"median_s": t_diff, "peak_mib": common.max_of(runs["diffusers"], "peak_mib"),
                      "runs": runs["diffusers"], "gflops": flops["diffusers"] / t_diff / 1e9,
                      "fraction_of_matmul": flops["diffusers"] / t_diff / 1e9 / rate},
        "variants": {k: ({**v, "ratio_to_exact": v["median_s"] / t_ldm} if "median_s" in v else v)
                     for k, v in variants.items()},
        "time_ratio": common.ratio(t_ldm, t_diff),
        "busy_core": busy,  # another process kept one core busy throughout
        "kernels": dataclasses.asdict(kernel_choice(torch.device("cpu"), torch.float32)),
        "max_abs_diff_vs_diffusers": max_diff,
    }  # fmt: skip
    path = common.save_results("unet_step-busy" if busy else "unet_step", spec, payload)
    print(
        f"U-Net step ({spec.name}, batch 2): ldm {t_ldm:.2f} s, diffusers {t_diff:.2f} s, "
        f"ratio {payload['time_ratio']:.3f}; {flops['diffusers'] / 1e12:.3f} TFLOP (ldm {flops['ldm'] / 1e12:.3f}), "
        f"ldm {payload['ldm']['gflops']:.0f} GFLOP/s = "
        f"{payload['ldm']['fraction_of_matmul']:.0%} of GEMM {rate:.0f} GFLOP/s; max |diff| {max_diff:.2e} -> {path}"
    )
    return payload


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main(sys.argv[1:])
