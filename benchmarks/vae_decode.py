"""VAE decode of one image of ldm against diffusers: time and peak resident memory.

    python benchmarks/vae_decode.py [--quick] [--size 1024]

Both engines load the same diffusers folder's VAE and decode the same seeded
latents (1, 4, size/8, size/8) under ``torch.inference_mode``. Peak memory is the
process's resident high-water mark during the timed decodes (weights and
libraries included; ``peak_increase_mib`` is the part above the resident memory
just before). ``--size`` also times ldm's tiled decode, the way to decode
large images in bounded memory.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def latents(size: int) -> torch.Tensor:
    return torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))


def load_decoder(impl: str, folder: str, mode: str):
    if impl == "diffusers":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        if mode == "tiled":
            vae.enable_tiling()
        return lambda z: vae.decode(z, return_dict=False)[0]
    from ldm.loading import load_vae_only

    vae = load_vae_only(folder)  # the VAE alone, as diffusers loads it above
    return vae.decode_tiled if mode == "tiled" else vae.decode


def run(args: dict[str, Any]) -> dict[str, Any]:
    spec = common.SPECS[args["spec"]]
    decode = load_decoder(args["impl"], args["folder"], args.get("mode", "full"))
    z = latents(args["size"])
    images = []

    def step() -> None:
        with torch.inference_mode():
            images.append(decode(z))
            del images[:-1]

    result = common.measure(step, warmup=args.get("warmup", 1), repeats=args.get("repeats", spec.repeats))
    if args.get("save"):
        torch.save(images[-1], args["save"].format(impl=args["impl"]))
    return result


def main(argv: list[str]) -> dict[str, Any]:
    spec = common.spec_from_argv(argv)
    folder, _ = common.build_model(spec)
    base = {"spec": "quick" if spec is common.QUICK else "full", "folder": str(folder), "size": spec.image_size}
    with tempfile.TemporaryDirectory() as tmp:
        runs = common.alternate("vae_decode.py", {**base, "save": str(Path(tmp) / "{impl}.pt")}, 2)
        max_diff = (torch.load(Path(tmp) / "ldm.pt") - torch.load(Path(tmp) / "diffusers.pt")).abs().max().item()
    summary = {
        impl: {"median_s": common.pooled(r), "peak_mib": common.max_of(r, "peak_mib"),
               "peak_increase_mib": common.max_of(r, "peak_increase_mib"), "runs": r}
        for impl, r in runs.items()
    }  # fmt: skip
    payload: dict[str, Any] = {
        **summary,
        "time_ratio": common.ratio(summary["ldm"]["median_s"], summary["diffusers"]["median_s"]),
        "peak_ratio": common.ratio(summary["ldm"]["peak_mib"], summary["diffusers"]["peak_mib"]),
        "peak_increase_ratio": common.ratio(summary["ldm"]["peak_increase_mib"], summary["diffusers"]["peak_increase_mib"]),
        "max_abs_diff_vs_diffusers": max_diff,
    }
    if "--size" in argv:
        size = int(argv[argv.index("--size") + 1])
        large = {**base, "size": size, "mode": "tiled", "warmup": 0, "repeats": 1}
        payload["large"] = {"size": size, **common.alternate("vae_decode.py", large, 1)}
    path = common.save_results("vae_decode", spec, payload)
    print(
        f"VAE decode ({spec.image_size}px): ldm {summary['ldm']['median_s']:.2f} s / {summary['ldm']['peak_mib']:.0f} MiB, "
        f"diffusers {summary['diffusers']['median_s']:.2f} s / {summary['diffusers']['peak_mib']:.0f} MiB; "
        f"ratios time {payload['time_ratio']:.3f}, peak {payload['peak_ratio']:.3f} "
        f"(increase {payload['peak_increase_ratio']:.3f}); max |diff| {max_diff:.2e} -> {path}"
    )
    return payload


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main(sys.argv[1:])
