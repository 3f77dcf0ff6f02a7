"""Which key layout the published LCM-LoRA files use, found from their byte sizes (no download needed).

ldm cannot fetch ``latent-consistency/lcm-lora-sdv1-5`` or ``lcm-lora-sdxl`` here, but their sizes are
public (the Hugging Face file listings): 134,621,556 and 393,854,592 bytes. A safetensors file's size
follows from its keys, shapes and dtypes (8 bytes of header length, the JSON header padded to 8 bytes,
then the data), so each candidate layout is written here at full size, zeros in fp16, rank 64, on the
U-Net modules the LCM-LoRA training script adapts (Luo et al. 2023; diffusers'
``train_lcm_distill_lora_*``: attention and feed-forward projections, proj_in/out, ResNet convs,
shortcuts and time projections, the down- and upsamplers' convs), and its size compared with the
published one. The header's JSON length differs by layout (key spellings, an ``alpha`` per module),
so only the right layout gives the exact size.

    python scripts/lcm_lora_layout.py

Prints one line per (model, layout, metadata) with the difference in bytes; exactly one line per model
has 0. (Measured: kohya keys with diffusers' module names, ``….lora_down.weight`` / ``….lora_up.weight``
/ ``….alpha``, for both files; SD 1.5's with ``{"format": "pt"}`` metadata.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator

import torch
from safetensors.torch import save_file

from ldm.models import UNet, UNetConfig

PUBLISHED_BYTES = {"lcm-lora-sdv1-5": (UNetConfig.sd1, 134_621_556), "lcm-lora-sdxl": (UNetConfig.sdxl, 393_854_592)}
RANK = 64
MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
           "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")  # fmt: skip


Layout = Callable[[str], tuple[str, ...]]  # module path -> (down key, up key[, alpha key])


def kohya(name: str) -> tuple[str, ...]:
    key = "lora_unet_" + name.replace(".", "_")
    return f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"


LAYOUTS: dict[str, Layout] = {
    "kohya keys, diffusers module names, alpha": kohya,
    "kohya keys, diffusers module names, no alpha": lambda name: kohya(name)[:2],
    "diffusers 0.2x (unet.….lora.down.weight)": lambda name: (f"unet.{name}.lora.down.weight", f"unet.{name}.lora.up.weight"),
    "peft (unet.….lora_A.weight)": lambda name: (f"unet.{name}.lora_A.weight", f"unet.{name}.lora_B.weight"),
}  # fmt: skip


def lora_shapes(unet: torch.nn.Module) -> Iterator[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(module path, down shape, up shape) for each adapted module, as LoRA trainers shape them."""
    for name, module in unet.named_modules():
        if not name.endswith(MODULES):
            continue
        if isinstance(module, torch.nn.Linear):
            yield name, (RANK, module.in_features), (module.out_features, RANK)
        elif isinstance(module, torch.nn.Conv2d):
            yield name, (RANK, module.in_channels, *module.kernel_size), (module.out_channels, RANK, 1, 1)


def file_bytes(unet: torch.nn.Module, layout: Layout, metadata: dict[str, str] | None) -> int:
    state = {}
    for name, down, up in lora_shapes(unet):
        for key, shape in zip(layout(name), (down, up, ())):
            state[key] = torch.zeros(shape, dtype=torch.float16)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "lora.safetensors")
        save_file(state, path, metadata=metadata)
        return os.path.getsize(path)


def main() -> None:
    for model, (config, published) in PUBLISHED_BYTES.items():
        with torch.device("meta"):
            unet = UNet(config())
        for label, layout in LAYOUTS.items():
            for metadata in (None, {"format": "pt"}):
                difference = file_bytes(unet, layout, metadata) - published
                print(f"{model}: {label}, metadata {metadata}: {difference:+d} bytes")


if __name__ == "__main__":
    main()
