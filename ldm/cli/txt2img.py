"""`ldm txt2img PROMPT`: generate images into numbered PNGs that carry their parameters.

Every argument is checked before the model is loaded, so a typo costs no
loading time; each mistake is a one-line message and exit code 2. The arguments
become a ``GenerationSettings`` (``build_settings``), which checks itself without
importing torch, so a mistake is answered in milliseconds; its errors name flags.
Image j of a prompt gets seed ``--seed + j`` whatever ``--batch-size`` is, so
any single image can be made again with ``--seed <its seed> --num-images 1``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ldm import checks
from ldm.cli import control_args, sdxl_args
from ldm.errors import CheckpointError, InputError
from ldm.images import check_output_folder, init_image_size, read_image
from ldm.inpainting import FILLS, INPAINT_DEFAULTS, Inpaint, parse_outpaint
from ldm.prompts import check_prompt
from ldm.random import resolve_seed
from ldm.settings import DEFAULT_HIRES_STRENGTH, DEFAULT_SCHEDULER, DEFAULTS, HIRES_UPSCALERS, SAMPLER_NAMES, GenerationSettings

if TYPE_CHECKING:
    from PIL import Image

DTYPES = ("fp32", "fp16", "bf16")


def register(sub) -> None:
    parser = sub.add_parser(
        "txt2img",
        help="generate images from a text prompt",
        description="Generate images from a text prompt (or img2img with --init-image) into numbered PNG files.",
    )
    parser.add_argument("prompt", nargs="?", help="the prompt; weights as (word:1.3), (word), [word]; BREAK starts a chunk")
    parser.add_argument("--from-file", type=Path, metavar="FILE", help="a text file with one prompt per line, instead of PROMPT")
    parser.add_argument("--negative-prompt", default="", metavar="TEXT", help="what the image should not show")
    parser.add_argument("--model", type=Path, metavar="PATH", help="diffusers folder or .safetensors/.ckpt file (default: the project's model)")
    parser.add_argument(
        "--config", type=Path, metavar="DIR", help="a diffusers folder whose configuration describes a --model file that carries none"
    )
    parser.add_argument(
        "--vae", type=Path, metavar="PATH",
        help="use this VAE instead of the model's: a KL-VAE .safetensors/.ckpt or diffusers folder, or TAESD (folder or taesd_*coder files)",
    )
    parser.add_argument(
        "--scheduler", metavar="NAME",
        help=f"{', '.join(SAMPLER_NAMES)} (default: the model's recommendation, else {DEFAULT_SCHEDULER})",
    )
    parser.add_argument("--eta", type=float, help="noise of DDIM steps (0: deterministic; only schedulers that take it)")
    parser.add_argument(
        "--timestep-spacing",
        choices=("leading", "linspace", "trailing"),
        help="which timesteps the steps visit (default: the model's, else the scheduler's diffusers default; "
        "trailing allows up to 1000 steps)",
    )
    parser.add_argument(
        "--sigma-schedule", choices=("spaced", "karras", "exponential"),
        help="noise levels of dpm-solver*, euler*, unipc: spaced as the timesteps (default), Karras et al. 2022, or log-even",
    )
    parser.add_argument("--karras", action="store_true", help="short for --sigma-schedule karras")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's recommendation, else 25)")
    parser.add_argument(
        "--guidance-scale", type=float, help="classifier-free guidance; <= 1 disables it (default: the model's recommendation, else 7.5)"
    )
    parser.add_argument("--guidance-rescale", type=float, default=DEFAULTS["guidance_rescale"], help="0..1, for v-prediction models (Lin et al. 2024)")
    parser.add_argument("--clip-skip", type=int, metavar="K", help="use the text encoder's k-th layer from the end, diffusers' meaning")
    parser.add_argument("--seed", type=int, default=-1, help="seed of the first image; image j gets seed + j (default -1: random)")
    parser.add_argument("--subseed", type=int, default=-1, help="variation seed (A1111's): image j leans toward subseed + j's noise (default -1: random)")
    parser.add_argument(
        "--subseed-strength", type=float, default=DEFAULTS["subseed_strength"], metavar="S",
        help="how far toward the variation seed's noise, 0 (off, the default) to 1",
    )  # fmt: skip
    parser.add_argument("--width", type=int, help="multiple of 8 (default: the model's native size or the init image's)")
    parser.add_argument("--height", type=int, help="multiple of 8 (default: the model's native size or the init image's)")
    parser.add_argument("--num-images", type=int, default=DEFAULTS["num_images_per_prompt"], metavar="N", help="images per prompt")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="images generated together (memory, not results)")
    parser.add_argument(
        "--max-pixels", type=int, default=checks.MAX_PIXELS, metavar="N",
        help=f"refuse batches of more than N pixels, width x height x batch size (default {checks.MAX_PIXELS}: 1024x1024 x 4)",
    )
    parser.add_argument("--init-image", type=Path, metavar="FILE", help="start from this image (img2img)")
    parser.add_argument("--strength", type=float, help="img2img: how much to change the image, in (0, 1] (default 0.8)")
    add_inpaint_arguments(parser)
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="apply a LoRA file (repeatable)")
    parser.add_argument(
        "--loras-dir", type=Path, metavar="DIR", help="where the prompt's <lora:NAME:WEIGHT> tags find NAME.safetensors (subfolders too)"
    )
    parser.add_argument(
        "--embeddings", type=Path, metavar="DIR",
        help="textual-inversion embeddings: a prompt word equal to a file's stem uses its vectors (a folder, or one file)",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=DTYPES, help="default: fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--vae-decode", choices=("full", "sliced", "tiled"), help="sliced/tiled bound memory (default: full)")
    parser.add_argument("--attention", choices=("sdpa", "sliced", "xformers"), help="attention backend (default: sdpa)")
    parser.add_argument("--cpu-offload", action="store_true", help="CUDA: keep each network on the CPU until it runs")
    speed = parser.add_argument_group("speed-ups (trade fidelity for speed; see docs/performance.md)")
    speed.add_argument("--deepcache", type=int, default=DEFAULTS["deepcache_interval"], metavar="N", help="full U-Net every N-th step only (DeepCache; 3 is ~2x; 1 = off)")
    speed.add_argument("--guidance-fraction", type=float, default=DEFAULTS["guidance_fraction"], metavar="F", help="guidance in the first F of the steps only (1 = off)")
    speed.add_argument("--tome", type=float, default=DEFAULTS["token_merging"], metavar="R", help="merge R (0..0.75) of the tokens in full-resolution self-attention (0 = off)")
    speed.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels-last memory format for the U-Net and VAE (default: in bf16 on the CPU, each network where it measured faster)",
    )  # fmt: skip
    control_args.add_arguments(parser)
    sdxl = parser.add_argument_group("SDXL (see docs/generating.md#sdxl)")
    sdxl.add_argument("--prompt-2", metavar="TEXT", help="what SDXL's second text encoder (OpenCLIP bigG) reads (default: the prompt)")
    sdxl.add_argument("--negative-prompt-2", metavar="TEXT", help="its negative prompt (default: --negative-prompt)")
    sdxl.add_argument("--refiner", type=Path, metavar="PATH", help="an SDXL refiner model (file or folder) that runs the last steps (A1111's Refiner)")
    sdxl.add_argument("--refiner-switch", type=float, metavar="F", help="the share of the steps the base runs before the refiner (default 0.8)")
    sdxl_args.add_arguments(sdxl)  # the micro-conditioning: --original-size, --crops-coords-top-left, ... (ldm/cli/sdxl_args.py)
    hires = parser.add_argument_group("hires fix (A1111's: a second, img2img pass at a larger size; see docs/generating.md)")
    hires.add_argument("--hires-scale", type=float, metavar="X", help="turn it on: the second pass at X times --width/--height (e.g. 2)")
    hires.add_argument("--hires-steps", type=int, default=0, metavar="N", help="the second pass's steps, of which strength x N run (0, the default: --steps)")
    hires.add_argument("--hires-strength", type=float, metavar="S", help=f"its denoising strength, in (0, 1] (default {DEFAULT_HIRES_STRENGTH})")
    hires.add_argument(
        "--hires-upscaler", metavar="NAME",
        help=f"latent (bilinear on the latents, the default) or lanczos (the decoded image, encoded again); all: {', '.join(HIRES_UPSCALERS)}",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("outputs"), metavar="DIR", help="output folder (default: outputs/)")
    parser.add_argument("--preview", type=Path, metavar="FILE", help="rewrite FILE (PNG) with a preview of the image after every step")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run, flag=flag)


# The flag of each GenerationSettings field whose flag is not "--" + its name with dashes.
FLAGS = {
    "prompt": "PROMPT",
    "num_inference_steps": "--steps",
    "num_images_per_prompt": "--num-images",
    "use_karras_sigmas": "--karras",
    "use_exponential_sigmas": "--sigma-schedule exponential",
    "deepcache_interval": "--deepcache",
    "token_merging": "--tome",
    "sdxl": "--refiner-switch",  # the schedule window the command line cuts; the micro-conditioning flags are named by field
    **control_args.FLAGS,
}


def add_inpaint_arguments(parser: argparse.ArgumentParser) -> None:
    """Inpainting and outpainting of ``--init-image`` (``ldm.inpainting.Inpaint``: A1111's options and defaults)."""
    group = parser.add_argument_group("inpainting and outpainting of --init-image (docs/generating.md)")
    group.add_argument("--mask", type=Path, metavar="FILE", help="repaint the white part of --init-image (of a transparent image: its opaque part)")
    group.add_argument(
        "--outpaint", metavar="L,R,T,B",
        help="grow --init-image by LEFT,RIGHT,TOP,BOTTOM pixels (multiples of 8), edges repeated outward, and paint the new borders",
    )  # fmt: skip
    group.add_argument(
        "--mask-blur", type=int, default=INPAINT_DEFAULTS["mask_blur"], metavar="PX",
        help=f"soften the mask's edge by PX pixels (Gaussian; default {INPAINT_DEFAULTS['mask_blur']}, A1111's)",
    )  # fmt: skip
    group.add_argument(
        "--inpainting-fill", choices=FILLS, default=INPAINT_DEFAULTS["inpainting_fill"],
        help="what the masked area starts from: the surrounding colours, the original (default), the seed's noise, zeros",
    )  # fmt: skip
    group.add_argument(
        "--inpaint-full-res", action="store_true",
        help="only masked: generate the mask's box at --width x --height (default: the model's size) and paste it back",
    )  # fmt: skip
    group.add_argument(
        "--inpaint-full-res-padding", type=int, default=INPAINT_DEFAULTS["inpaint_full_res_padding"], metavar="PX",
        help=f"--inpaint-full-res: pixels around the mask's box (default {INPAINT_DEFAULTS['inpaint_full_res_padding']})",
    )  # fmt: skip
    group.add_argument("--inpainting-mask-invert", action="store_true", help="repaint the black part of --mask instead")


def inpaint_argument(args: argparse.Namespace) -> Inpaint | None:
    """``--mask`` or ``--outpaint`` with their options; an option without either is an error, not ignored."""
    options = {name: getattr(args, name) for name in INPAINT_DEFAULTS}
    if args.mask is None and args.outpaint is None:
        given = [flag(name) for name, value in options.items() if value != INPAINT_DEFAULTS[name]]
        if given:
            raise InputError(f"{', '.join(given)} apply to inpainting; add --mask FILE (or --outpaint L,R,T,B)")
        return None
    return Inpaint(mask=args.mask, outpaint=parse_outpaint(args.outpaint) if args.outpaint is not None else None, **options)


def flag(field: str) -> str:
    """The command-line flag of a setting, as error messages name it."""
    return FLAGS.get(field, field if field.startswith("-") else "--" + field.replace("_", "-"))


@dataclass(frozen=True)
class Job:
    """Everything checked and resolved from the command line before any model is loaded."""

    settings: GenerationSettings  # of all the prompts' images; each batch is a copy with its prompt and seeds
    model: Path
    loras: list[tuple[Path, float]]
    vae: Path | None = None  # replaces the model's VAE
    embeddings: Path | None = None  # a folder (or file) of textual-inversion embeddings


def run(args: argparse.Namespace) -> int:
    job = check_arguments(args)

    import torch

    from ldm.pipeline import Pipeline

    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    if args.cpu_offload and device.type != "cuda":
        raise InputError("--cpu-offload only helps on a CUDA device; drop it or pass --device cuda")

    pipe = Pipeline.from_pretrained(
        job.model, device="cpu" if args.cpu_offload else device, dtype=dtype, config=args.config, vae=job.vae
    )
    for path, scale in job.loras:
        pipe.load_lora(path, scale=scale, fuse=True)  # merged into the weights, as A1111 does: no cost per step
    if args.loras_dir is not None:
        pipe.configure(loras_dir=args.loras_dir)
    if job.embeddings is not None:
        pipe.load_embeddings(job.embeddings)
    # One call makes every image: free each network once its stage is done (peak memory is about
    # the U-Net's weights instead of all of them); the image is the same.
    one_shot = len(job.settings.prompt) * math.ceil(args.num_images / args.batch_size) == 1
    given = {"attention": args.attention, "decode_mode": args.vae_decode}  # else the pipeline's own defaults
    pipe.configure(
        device=device, cpu_offload=args.cpu_offload, channels_last=args.channels_last, max_pixels=args.max_pixels,
        weights_after_use="release" if one_shot else "page-out", **{k: v for k, v in given.items() if v is not None},
    )
    generate_all(pipe, job.settings, args)
    return 0


def generate_all(pipe, settings: GenerationSettings, args: argparse.Namespace) -> None:
    """Every prompt's images in calls of ``--batch-size``, each image saved as soon as its call ends."""
    from tqdm import tqdm

    steps = settings.num_inference_steps or pipe.defaults.num_inference_steps
    steps += replace(settings, num_inference_steps=steps).hires_pass_steps  # the hires pass counts on
    total = len(settings.prompt) * args.num_images
    images_bar = tqdm(total=total, desc="images", unit="img", disable=args.quiet or total <= args.batch_size, file=sys.stderr)
    for prompt, negative in zip(settings.prompt, settings.negative_prompt):
        for first in range(0, args.num_images, args.batch_size):
            count = min(args.batch_size, args.num_images - first)
            batch = replace(
                settings.from_image(first), prompt=(prompt,), negative_prompt=(negative,), num_images_per_prompt=count,
                prompt_2=settings.prompt_2 and settings.prompt_2[:1], negative_prompt_2=settings.negative_prompt_2 and settings.negative_prompt_2[:1],
            )  # fmt: skip
            steps_bar = tqdm(total=steps, desc="steps", leave=False, disable=args.quiet, file=sys.stderr)
            result = pipe.generate(batch, callback=step_callback(steps_bar, args.preview, pipe.vae))
            steps_bar.close()
            for path in result.save(args.out):
                tqdm.write(str(path), file=sys.stdout)
                images_bar.update(1)
    images_bar.close()


def step_callback(bar, preview_path: Path | None, vae):
    """After each step: advance the progress bar and, with ``--preview``, rewrite the preview file."""
    from ldm.previews import preview, write_preview

    def after_step(i, t, latents, denoised) -> None:
        bar.update(1)
        image = preview(vae, denoised) if preview_path is not None else None
        if image is not None:
            write_preview(image, preview_path)

    return after_step


def check_arguments(args: argparse.Namespace) -> Job:
    """Check every argument that can be checked without the model; raise ``InputError`` / ``CheckpointError``.

    The settings come first and import no torch; the scheduler, device and model after. A setting's
    error names its flag.
    """
    for name, value in (("--num-images", args.num_images), ("--batch-size", args.batch_size)):
        checks.check_count(value, name)
    checks.check_max_pixels(args.max_pixels, "--max-pixels")
    settings = build_settings(args)
    from ldm.loading import DEFAULT_MODEL_DIR
    from ldm.schedulers import check_options, check_spacing

    if settings.scheduler is not None:  # else the model's, checked when it is known
        check_options(settings.scheduler, settings.scheduler_options())
        check_spacing(settings.scheduler, settings.timestep_spacing)
    if args.device is not None:
        check_device(args.device)
    if args.dtype == "fp16" and args.device is not None and args.device.startswith("cpu"):
        raise InputError("--dtype fp16 needs a CUDA device; on the CPU use fp32 or bf16")

    model = args.model
    if model is None:
        if not Path(DEFAULT_MODEL_DIR).exists():
            raise CheckpointError(f"no default model at {DEFAULT_MODEL_DIR} yet; pass --model FOLDER_OR_FILE")
        model = Path(DEFAULT_MODEL_DIR)
    elif not model.exists():
        raise CheckpointError(f"model {model} does not exist; pass a diffusers folder or a .safetensors/.ckpt file")
    if args.config is not None:
        from ldm.loading import check_config_folder

        if model.is_dir():
            raise InputError(f"--config describes a model file; {model} is a folder with its own configuration, drop --config")
        check_config_folder(args.config)
    loras = [lora_argument(text) for text in args.lora]
    check_lora_tags(settings, args.loras_dir)
    if args.vae is not None:
        from ldm.loading import find_vae

        find_vae(args.vae)  # exists and holds a VAE; its latent width is checked against the model's on loading
    if args.refiner is not None and not args.refiner.exists():
        raise InputError(f"--refiner {args.refiner} does not exist; give an SDXL refiner's .safetensors file or folder")
    if args.embeddings is not None and not args.embeddings.exists():
        raise InputError(f"--embeddings {args.embeddings} does not exist; give a folder of embedding files (or one file)")
    if settings.init_image is None and (args.width is None or args.height is None):
        check_native_size(args, model)
    return Job(settings, model, loras, args.vae, args.embeddings)


def build_settings(args: argparse.Namespace) -> GenerationSettings:
    """The command line's ``GenerationSettings``, checked; the first seed drawn if ``--seed`` is -1. Imports no torch."""
    if (args.prompt is None) == (args.from_file is None):
        raise InputError("give either a PROMPT or --from-file FILE (one prompt per line)")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.from_file)
    check_output_folder(args.out, "--out")
    if args.preview is not None:
        from ldm.previews import check_preview_path

        check_preview_path(args.preview)
    settings = GenerationSettings(
        prompt=tuple(prompts), negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale, guidance_fraction=args.guidance_fraction,
        width=args.width, height=args.height, num_images_per_prompt=args.num_images, scheduler=args.scheduler,
        eta=args.eta, timestep_spacing=args.timestep_spacing, seed=args.seed, sigma_schedule=sigma_schedule(args),
        subseed=args.subseed, subseed_strength=args.subseed_strength,
        init_image=check_init_image(args), strength=args.strength, clip_skip=args.clip_skip,
        deepcache_interval=args.deepcache, token_merging=args.tome, control=control_args.control_units(args),
        hires_scale=args.hires_scale, hires_steps=args.hires_steps, hires_strength=args.hires_strength, hires_upscaler=args.hires_upscaler,
        inpaint=inpaint_argument(args),
        prompt_2=args.prompt_2, negative_prompt_2=args.negative_prompt_2, refiner=args.refiner, refiner_switch=args.refiner_switch,
        sdxl=sdxl_args.sdxl_options(args),
    )
    subseed = resolve_seed(settings.subseed, args.num_images, "subseed") if settings.subseed_strength else None
    return replace(settings, seed=resolve_seed(settings.seed, args.num_images), subseed=subseed)


def sigma_schedule(args: argparse.Namespace) -> str:
    """``--sigma-schedule``, or karras for its shorthand ``--karras``."""
    if args.karras and args.sigma_schedule not in (None, "karras"):
        raise InputError(f"--karras and --sigma-schedule {args.sigma_schedule} exclude each other; choose one")
    return "karras" if args.karras else args.sigma_schedule or "spaced"


def check_init_image(args: argparse.Namespace) -> Image.Image | None:
    """The ``--init-image`` read upright as RGB, and the batch it sets checked against ``--max-pixels``."""
    init_image = read_image(args.init_image) if args.init_image is not None else None
    width, height = args.width, args.height
    if init_image is not None:  # SD's factor 8: the model, and so its VAE's, is not loaded yet
        width, height = init_image_size(init_image, width, height, 8, f"init image {args.init_image}")
    if width is not None and height is not None:  # else the model's size: check_native_size
        checks.check_pixels(width, height, min(args.batch_size, args.num_images), args.max_pixels, "--max-pixels")
    return init_image


def check_native_size(args: argparse.Namespace, model: Path) -> None:
    """``--max-pixels`` for a size that comes from the model, where its configuration says it without loading it."""
    from ldm.loading.configs import native_side_estimate

    side = native_side_estimate(model, args.config)
    if side is not None:  # else known once the model is loaded: the pipeline checks max_pixels then
        width, height = args.width or side, args.height or side
        checks.check_pixels(width, height, min(args.batch_size, args.num_images), args.max_pixels, "--max-pixels")


def read_prompts(path: Path) -> list[str]:
    """The non-blank lines of ``path``, stripped; an undecodable line is named by its number."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read prompts from {path}: {error.strerror or error.__class__.__name__}") from None
    prompts = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise InputError(
                f"{path} line {number} is not valid UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1}); "
                "save the file as UTF-8"
            ) from None
        if line:
            check_prompt(line, f"{path} line {number}")
            prompts.append(line)
    if not prompts:
        raise InputError(f"{path} has no prompts; write one prompt per line")
    return prompts


def check_lora_tags(settings: GenerationSettings, folder: Path | None) -> None:
    """Each prompt's LoRA tags name files in ``--loras-dir`` (each prompt runs in calls of its own)."""
    from ldm.adapters.folder import find_lora
    from ldm.prompts import split_lora_tags

    if folder is not None and not folder.is_dir():
        raise InputError(f"--loras-dir {folder} is not a folder")
    for text in settings.prompt:
        for tag in split_lora_tags(text)[1]:
            try:
                find_lora(folder, tag.name)
            except InputError as error:
                raise InputError(f"{tag.text} in the prompt: {error}") from None


def lora_argument(text: str) -> tuple[Path, float]:
    from ldm.adapters import parse_lora_argument

    path, scale = parse_lora_argument(text)
    if path.is_dir():
        raise InputError(f"--lora {path} is a folder, not a LoRA file; give the .safetensors file in it")
    if not path.is_file():
        raise InputError(f"LoRA file {path} does not exist (--lora FILE[:SCALE])")
    return path, scale


def check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} but no CUDA device is available; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported --device {name!r}; use cpu, cuda or cuda:N")
