"""`ldm finetune`: train a model (full U-Net or LoRA) on a folder of captioned images.

    ldm finetune --model M --data DIR --output OUT [--lora-rank 8] [--checkpointing-steps 500] [--resume latest]
    accelerate launch --multi_gpu --num_processes 2 -m ldm finetune ...     # DDP on several GPUs, same options
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 -m ldm finetune ...   # sharded (FSDP2, GPUs)

Everything the user can get wrong (settings, output folder, and data when ``--resolution`` is given)
is checked before the model is loaded; the default resolution is the model's native size. The result
is ``OUT/model`` (a diffusers folder for ``ldm txt2img --model`` and ``Pipeline.from_pretrained``) or
``OUT/lora.safetensors`` (for ``--lora`` / ``Pipeline.load_lora``), kept in the run's last checkpoint
too, so that continuing the run (``--resume latest --max-steps N``) can replace it (``results.py``).
Ctrl-C saves a checkpoint and exits with code 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

from ldm.errors import ConfigError, SettingError
from ldm.training.config import DataConfig, TrainConfig

# Settings whose flag is not "--" + the field name with dashes.
FLAGS = {"log_format": "--log", "sample_prompts": "--sample-prompt", "buckets": "--no-buckets"}


def register(sub) -> None:
    parser = sub.add_parser("finetune", help="fine-tune a model (full U-Net or LoRA) on captioned images",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("model, data, output")
    io.add_argument("--model", required=True, help="diffusers folder or .safetensors/.ckpt file to start from")
    io.add_argument("--data", required=True, type=Path, help="folder of images with .txt captions or a metadata.jsonl")
    io.add_argument("--output", required=True, type=Path, help="run folder: checkpoints, log, samples and the result")
    io.add_argument("--resume", help="'latest' or a checkpoint folder: continue a killed or finished run")
    io.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"), help="override the model's")

    data = parser.add_argument_group("data")
    data.add_argument("--resolution", type=int, help="training size in pixels (multiple of 8; default: the model's native size)")
    data.add_argument("--crop", choices=("center", "random"), default="center")
    data.add_argument("--random-flip", action="store_true", help="mirror images left-right at random")
    data.add_argument("--no-buckets", action="store_true", help="crop everything square instead of aspect-ratio buckets")
    data.add_argument("--small-images", choices=("upscale", "skip"), default="upscale", help="images below the resolution")
    data.add_argument("--caption-dropout", type=float, default=0.0, help="probability of the empty caption (e.g. 0.1)")
    data.add_argument("--allow-empty-captions", action="store_true", help="train images without captions on ''")
    data.add_argument("--caption-column", default="text", help="caption field of metadata.jsonl")
    data.add_argument("--cache-latents", action="store_true", help="encode each image once (needs --crop center)")
    data.add_argument("--cache-text-embeddings", action="store_true", help="encode each caption once (frozen encoder)")

    loop = parser.add_argument_group("optimisation")
    loop.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    loop.add_argument("--batch-size", type=int, default=1, help="images per process per step")
    loop.add_argument("--gradient-accumulation-steps", type=int, default=1)
    loop.add_argument("--learning-rate", type=float, default=1e-5)
    loop.add_argument("--text-encoder-learning-rate", type=float, help="default: --learning-rate")
    loop.add_argument("--adam-beta1", type=float, default=0.9)
    loop.add_argument("--adam-beta2", type=float, default=0.999)
    loop.add_argument("--weight-decay", type=float, default=1e-2)
    loop.add_argument("--adam-epsilon", type=float, default=1e-8)
    loop.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default="constant")
    loop.add_argument("--lr-warmup-steps", type=int, default=0)
    loop.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 disables it")
    loop.add_argument("--min-snr-gamma", type=float, help="Min-SNR loss weighting (5 is the paper's choice)")
    loop.add_argument("--noise-offset", type=float, default=0.0, help="e.g. 0.05 for darker darks, brighter brights")
    loop.add_argument("--gradient-checkpointing", action="store_true", help="less memory, slower")
    loop.add_argument("--ema-decay", type=float, help="keep EMA weights (e.g. 0.9999) and write them as the result")
    loop.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                      help="autocast: fp16/bf16 on CUDA, bf16 on a CPU with native bf16; master weights stay fp32")
    loop.add_argument("--seed", type=int, default=0)
    loop.add_argument("--num-workers", type=int, default=0, help="data-loading processes")

    what = parser.add_argument_group("what is trained")
    what.add_argument("--train-text-encoder", action="store_true")
    what.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead of the full U-Net")
    what.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")

    out = parser.add_argument_group("checkpoints, log, samples")
    out.add_argument("--checkpointing-steps", type=int, default=500,
                     help="write the full training state every N steps and at the last one (0: never)")
    out.add_argument("--checkpoints-total-limit", type=int, default=3,
                     help="keep only the newest K checkpoints (0: all); a finished run's last one is always kept")
    out.add_argument("--log", choices=("csv", "tensorboard"), default="csv")
    out.add_argument("--log-every", type=int, default=1)
    out.add_argument("--sample-every", type=int, help="render --sample-prompt images every N steps")
    out.add_argument("--sample-prompt", action="append", default=[], help="repeatable")
    out.add_argument("--sample-steps", type=int, help="default: the model's (generation_config.json), else 25")
    out.add_argument("--sample-guidance-scale", type=float, help="default: the model's (generation_config.json), else 7.5")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run, flag=flag)


def flag(field: str) -> str:
    """The command-line flag of a ``DataConfig`` / ``TrainConfig`` field."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def configs_from_args(args: argparse.Namespace) -> tuple[DataConfig, TrainConfig]:
    """Both configs, checked; an invalid setting is reported by its flag, not its field name."""
    try:
        return build_configs(args)
    except SettingError as error:
        raise ConfigError(error.worded(flag)) from None


def build_configs(args: argparse.Namespace) -> tuple[DataConfig, TrainConfig]:
    data = DataConfig(
        resolution=args.resolution,
        crop=args.crop,
        random_flip=args.random_flip,
        buckets=not args.no_buckets,
        small_images=args.small_images,
        caption_dropout=args.caption_dropout,
        allow_empty_captions=args.allow_empty_captions,
        caption_column=args.caption_column,
        cache_latents=args.cache_latents,
        cache_text_embeddings=args.cache_text_embeddings,
    )
    if args.cache_text_embeddings and args.train_text_encoder:
        raise ConfigError("--cache-text-embeddings needs a frozen text encoder; drop it or --train-text-encoder")
    config = TrainConfig(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        weight_decay=args.weight_decay,
        adam_epsilon=args.adam_epsilon,
        lr_schedule=args.lr_schedule,
        lr_warmup_steps=args.lr_warmup_steps,
        max_grad_norm=args.max_grad_norm or None,
        min_snr_gamma=args.min_snr_gamma,
        noise_offset=args.noise_offset,
        gradient_checkpointing=args.gradient_checkpointing,
        ema_decay=args.ema_decay,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        train_text_encoder=args.train_text_encoder,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        text_encoder_learning_rate=args.text_encoder_learning_rate,
        checkpointing_steps=args.checkpointing_steps or None,
        checkpoints_total_limit=args.checkpoints_total_limit or None,
        sample_every=args.sample_every,
        sample_prompts=tuple(args.sample_prompt),
        sample_steps=args.sample_steps,  # None: the model's recommendation (ldm.training renders as txt2img)
        sample_guidance_scale=args.sample_guidance_scale,
        log_every=args.log_every,
        log_format=args.log,
        num_workers=args.num_workers,
    )
    return data, config


def scan_data(folder: Path, config: DataConfig) -> list:
    """``scan_folder``, its ``DataWarning``s shown as one plain line each (not Python's warning format,
    which adds a source file, line number and code line that mean nothing to a user)."""
    from ldm.training import DataWarning, scan_folder

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = scan_folder(folder, config)
    for warning in caught:
        if issubclass(warning.category, DataWarning):
            print(f"ldm finetune: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return examples


def check_mixed_precision(precision: str, cuda: bool) -> None:
    """On a CPU: bf16 where the CPU computes it natively (autocast; fp32 master weights), never fp16 (its CPU
    convolutions are orders of magnitude slower than fp32's)."""
    from ldm.kernels.cpu import this_cpu

    if precision == "no" or cuda:
        return
    if precision == "fp16":
        raise ConfigError("--mixed-precision fp16 needs a CUDA GPU; on a CPU use --mixed-precision bf16 (where the CPU has it) or no")
    cpu = this_cpu()
    if not cpu.native_bf16:
        raise ConfigError(
            f"--mixed-precision bf16: this CPU ({cpu.model}) has no native bf16 (AVX512_BF16, AMX or Arm BF16), "
            "so it would run slower than fp32; use --mixed-precision no"
        )


def load_dtype(config: TrainConfig):
    """What the model is read in: in a mixed-precision LoRA run every loaded weight stays frozen in that precision
    (the adapters are made in fp32), so it is read straight into it, never held in fp32 first (an SDXL model: 7
    instead of 14 GB); a network trained whole keeps fp32 master weights."""
    import torch

    from ldm.training.loop import DTYPES

    return DTYPES[config.mixed_precision] if config.lora else torch.float32


def native_resolution(components) -> int:
    """The image size the model was trained at: the U-Net's latent size times the VAE's downsampling."""
    from ldm.loading.configs import native_side

    return native_side(components.unet.config, components.vae.config)


def interrupted_message(stop, output: Path) -> str:
    """Where the interrupted run's state is and the option that continues it."""
    resume = "latest" if stop.checkpoint.parent == output / "checkpoints" else str(stop.checkpoint)
    return f"interrupted at step {stop.step}; saved {stop.checkpoint}; continue with the same options and --resume {resume}"


def run(args: argparse.Namespace) -> int:
    # Heavy imports after argument parsing keep `ldm --help` and the other commands fast.
    import torch

    from ldm.loading import load_components, model_family
    from ldm.training import ImageCaptionDataset, train
    from ldm.training.interrupt import TrainingInterrupted
    from ldm.training.loop import check_family
    from ldm.training.results import check_output, result_path, save_result

    data_config, config = configs_from_args(args)
    check_mixed_precision(config.mixed_precision, torch.cuda.is_available())
    target = result_path(args.output, config)
    superseded = check_output(args.output, target, args.resume, config)
    # A given --resolution lets the data be checked before the (slow) model load; the default, the
    # model's native size, is known only once the model is read.
    examples = scan_data(args.data, data_config) if data_config.resolution is not None else None
    check_family(model_family(args.model), config, args.model)  # before the slow load: the file says its family
    components = load_components(args.model, prediction_type=args.prediction_type, dtype=load_dtype(config))
    if components.unet.config.in_channels != components.vae.config.latent_channels:  # loads since inpainting runs
        raise ConfigError(f"{args.model} is an inpainting model (its U-Net reads a mask); ldm finetune trains text-to-image models")
    if examples is None:
        data_config = dataclasses.replace(data_config, resolution=native_resolution(components))
        examples = scan_data(args.data, data_config)
    dataset = ImageCaptionDataset(examples, data_config, seed=config.seed)
    try:
        result = train(components, dataset, config, args.output, resume=args.resume, show_progress=not args.no_progress)
    except TrainingInterrupted as stop:
        print(f"ldm finetune: {interrupted_message(stop, args.output)}", file=sys.stderr)
        return 130
    if not result.is_main_process:
        return 0
    # Named after the run's folder: images made with OUT/model say "Model: <OUT's name>", not "model".
    writer = result_writer(result, components, config, args.output.resolve().name, dataset, args)
    written = save_result(target, result.checkpoint, writer)
    loss = "" if result.last_loss is None else f" (last loss {result.last_loss:.4f})"
    print(f"wrote {written} after {result.step} steps{loss}")
    if superseded is not None:
        print(f"the shorter run's result is kept in {superseded / target.name}")
    return 0


def result_writer(result, components, config: TrainConfig, name: str, dataset, args: argparse.Namespace):
    """``save(path)``: the trained LoRA adapters (with kohya's training metadata) or the whole model (diffusers
    folder, recording ``name``), written atomically."""
    from ldm.adapters.training import save_lora
    from ldm.loading import load_components, save_diffusers
    from ldm.training.lora_metadata import lora_metadata

    if config.lora:
        metadata = lora_metadata(
            config, dataset.config, [example.caption for example in dataset.examples], args.data, components.family,
            components.scheduler_config.prediction_type, Path(args.model), name, result.step,
        )
        text_encoder = result.text_encoder if config.train_text_encoder else None
        return lambda path: save_lora(path, result.unet, text_encoder, metadata)
    # Mixed precision stored the frozen parts in half precision (rounded in place): the saved model reads them
    # from the source again, exact. Everything else (scheduler, generation_config.json...) is the base model's.
    source = components if config.mixed_precision == "no" else load_components(args.model, prediction_type=args.prediction_type)
    text_encoder = result.text_encoder.float() if config.train_text_encoder else source.text_encoder
    trained = dataclasses.replace(source, unet=result.unet.float(), text_encoder=text_encoder)
    return lambda path: save_diffusers(trained, path, name=name)
