"""`ldm merge A B [C] OUT`: merge checkpoints, or bake LoRAs into one, tensor by tensor.

    ldm merge A.safetensors B.safetensors --alpha 0.3 OUT.safetensors                 # (1-a)·A + a·B
    ldm merge A B C --method add-difference --alpha 1 --parts unet,text_encoder OUT    # A + a·(B - C)
    ldm merge A.safetensors --lora style.safetensors:0.8 --lora detail.safetensors OUT.safetensors

The recipes are AUTOMATIC1111's checkpoint merger's, over the networks named by --parts (default: the
U-Net); the other networks' tensors are copied from A. LoRAs (any kind ldm applies) are fused into the
result as `ldm txt2img --lora` fuses them. Inputs are single files (.safetensors, .ckpt) of one
family, checked key by key before anything is written; the output is a .safetensors file in A's
layout, or a diffusers folder for any other name. It is written atomically, streamed (a few tensors
in memory at a time), and an existing OUT is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser("merge", help="merge two or three checkpoints, or bake LoRAs into one",
                            description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, metavar="MODEL", help="A [B [C]] then OUT (.safetensors or a folder name)")
    parser.add_argument("--method", choices=("weighted-sum", "add-difference"),
                        help="default: weighted-sum for two models, add-difference for three")
    parser.add_argument("--alpha", type=float, default=0.5, help="a in (1-a)·A + a·B or A + a·(B - C) (default 0.5)")
    parser.add_argument("--parts", default="unet", help="networks to merge, comma-separated: unet, text_encoder, vae (default: unet)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="fuse this adapter into the result (repeatable)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="store the weights in this precision (default: A's)")
    parser.set_defaults(run=run, flag=lambda field: {"alpha": "--alpha"}.get(field, field), more_paths=more_paths)


def more_paths(args: argparse.Namespace, rest: list[str]) -> None:
    """Paths given after options (``ldm merge A --lora F OUT``) follow the ones before them."""
    args.paths += [Path(text) for text in rest]


def run(args: argparse.Namespace) -> int:
    from ldm.adapters import parse_lora_argument
    from ldm.errors import InputError
    from ldm.loading.components import parse_dtype
    from ldm.loading.merge import MergeRecipe, merge

    if len(args.paths) < 2:
        raise InputError("give the model(s) to merge and OUT, e.g. ldm merge A.safetensors B.safetensors OUT.safetensors")
    *models, out = args.paths
    if len(models) > 3:
        raise InputError(f"ldm merge takes at most three models (A B C) and OUT, got {len(models)} models")
    method = args.method or {2: "weighted-sum", 3: "add-difference"}.get(len(models))
    recipe = MergeRecipe(
        models=tuple(models),
        method=method,
        alpha=args.alpha,
        parts=tuple(part.strip() for part in args.parts.split(",") if part.strip()),
        loras=tuple(parse_lora_argument(text) for text in args.lora),
        dtype=parse_dtype(args.dtype) if args.dtype else None,
    )
    written = merge(recipe, out)
    what = f"{method} (alpha {args.alpha}) of {', '.join(map(str, models))}" if method else str(models[0])
    loras = f" with {len(recipe.loras)} LoRA(s) fused" if recipe.loras else ""
    print(f"wrote {written}: {what}{loras}")
    return 0
