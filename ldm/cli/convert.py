"""`ldm convert SRC DST`: between the original single-file layout and a diffusers folder (SD 1.x, 2.x, SDXL).

The direction follows DST: a name ending in ``.safetensors`` or ``.ckpt`` is written as
one original-layout file, anything else as a diffusers folder. SRC may be either form
(a single file can also be re-saved as a single file, e.g. ``.ckpt`` -> ``.safetensors``).
DST is written atomically and never overwritten, and converting the same SRC twice gives
the same bytes. Everything ldm reads comes back: a single file carries, in its metadata,
the configuration that SD's conventions would not give back (other widths, heads, groups,
sizes, VAE scaling, scheduler) and the model's generation_config.json; a folder gets it as
files. A single file without it (other tools' files) can be described by --config FOLDER. SDXL base and
refiner convert both ways too (conditioner.embedders.N <-> text_encoder/, text_encoder_2/, tokenizer_2/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.errors import InputError


def register(sub) -> None:
    parser = sub.add_parser(
        "convert",
        help="convert a model between the single-file (.safetensors/.ckpt) and the diffusers folder layout",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", type=Path, help="a .safetensors/.ckpt single file or a diffusers model folder")
    parser.add_argument("dst", type=Path, help="DST.safetensors / DST.ckpt for a single file, any other name for a folder")
    parser.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction", "sample"),
        default=None,
        help="what the U-Net predicts, when the source does not say or says it wrongly (default: from SRC)",
    )
    parser.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default=None,
        help="store the weights in this precision (default: fp32)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="a CLIP tokenizer folder, or sd1 / sd2 / sdxl for the shipped one (single-file SRC; SDXL's tokenizer_2 "
        "comes from --config or is the shipped one, padding with '!')",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="DIR",
        help="a diffusers folder whose configuration describes a single-file SRC that carries none (default: "
        "what SRC carries, else SD's conventions)",
    )
    parser.set_defaults(run=run, flag=str)  # its errors name no settings


def run(args: argparse.Namespace) -> int:
    from ldm.loading import load_components, save_diffusers, save_single_file
    from ldm.loading.components import parse_dtype
    from ldm.loading.single_file import SUFFIXES

    if args.dst.exists():
        raise InputError(f"{args.dst} already exists; ldm convert never overwrites, choose a new name")
    if args.src.resolve() == args.dst.resolve():
        raise InputError("SRC and DST are the same path; choose a new DST")
    # Loading straight into the target precision: one copy of the weights in memory.
    dtype = parse_dtype(args.dtype or "fp32")
    components = load_components(
        args.src, dtype=dtype, prediction_type=args.prediction_type, tokenizer=args.tokenizer, config=args.config
    )
    if args.dst.suffix in SUFFIXES:
        written = save_single_file(components, args.dst)
    else:
        written = save_diffusers(components, args.dst)
    print(f"{components.family} ({components.scheduler_config.prediction_type}) {args.src} -> {written}")
    return 0
