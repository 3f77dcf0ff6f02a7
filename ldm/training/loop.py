"""The training loop: ``train`` over already-built models, read top to bottom; its parts follow it in order.

  set-up      ``set_up``: (1) freeze what is not trained and inject LoRA adapters if asked,
              (2) optimizer and learning-rate schedule, (3) hand the trained models to accelerate
              (device, DDP or FSDP2, mixed precision, gradient accumulation), then EMA: a frozen ``Run``
  resume      ``resume_from``: (4) weights, optimizer, schedule, EMA, RNG and data position
  batch       ``data_feed``, ``epochs``: (5) this rank's micro-batches, from the data position on
  step        ``micro_step``: latents and text embeddings → noise, predict, loss → backward, clip,
              step; ``end_step``: schedule, EMA, the step's loss
  report      ``Report`` (progress bar, metrics log), ``render_samples``
  checkpoint  ``write_checkpoint``, every N steps and at the last; and Ctrl-C, acted on only in
              ``train``, between optimizer steps; then ``final_result``

What changes as the run goes (step, data position, last loss, newest checkpoint) is one ``Progress``;
everything else the parts share is the ``Run``.

Sharding (FSDP2): each rank holds a slice of every trained parameter, so whatever needs whole
weights (checkpoints, sample images, the result) gathers them with the collective functions of
``distributed.py``, on every rank at the same point of the loop; see that module for what is refused.

Reproducibility: the noise and timesteps of micro-batch ``m`` of optimizer step ``s`` on rank
``r`` come from a generator seeded with (seed, r, s, m), and every image's augmentation from
(seed, epoch, image) (see ``data.py``), so a run resumed from a checkpoint redraws exactly what the
uninterrupted run drew.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, GradientAccumulationPlugin, gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm

from ldm.errors import ConfigError
from ldm.adapters.training import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_adapters
from ldm.random import randn
from ldm.schedulers import SCHEDULERS, NoiseProcess, SchedulerConfig
from ldm.settings import GenerationDefaults
from ldm.training import checkpoint as ckpt
from ldm.training.captions import CaptionEncoders, TextCondition, encode_captions
from ldm.training.config import TrainConfig
from ldm.training.data import BucketBatches, ImageCaptionDataset, collate
from ldm.training.distributed import (
    check_backend,
    check_units,
    gather_optimizer_state,
    gather_tensors,
    load_optimizer_state,
    load_parameters,
    materialize,
    meta_skeleton,
    trainable_parameters,
)
from ldm.training.ema import EMA
from ldm.training.interrupt import InterruptFlag, TrainingInterrupted, ignore_interrupts
from ldm.training.objective import diffusion_loss
from ldm.training.reporting import MetricsLog, SampleRequest, save_samples

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelSet(Protocol):
    """What ``train`` needs; ``ldm.loading.Components`` has exactly these attributes."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler_config: SchedulerConfig
    generation_config: dict[str, Any]  # the model's recommended steps and guidance ({}: SD's)
    # SDXL's second text encoder (OpenCLIP bigG) and tokenizer: optional, a model set without them is SD 1.x / 2.x
    # (``sdxl_text``).


@dataclass
class TrainResult:
    # Trained (EMA weights if EMA was on); with LoRA, carries the peft adapters. Under FSDP2 these
    # are plain copies with whole weights on the main process and the sharded modules elsewhere.
    unet: nn.Module
    text_encoder: nn.Module
    step: int  # optimizer steps done in total
    last_loss: float | None
    is_main_process: bool
    checkpoint: Path | None = None  # the checkpoint holding exactly this final state, if one does


@dataclass(frozen=True)
class Run:
    """What set-up builds and every later part of the run reads. Frozen: no part swaps a model, the
    optimizer or an EMA for another (their weights and state of course change as they train)."""

    config: TrainConfig
    models: ModelSet  # as given: the frozen VAE, the tokenizer and the scheduler settings are read from here
    dataset: ImageCaptionDataset
    output_dir: Path
    accelerator: Accelerator
    weight_dtype: torch.dtype  # of the frozen models; trained ones keep fp32 master weights
    scheduler: NoiseProcess  # the model's noise process: add_noise and training_target of the objective
    text_encoder: nn.Module  # what captions are encoded with (LoRA-injected if asked), trained or frozen
    text_encoder_2: nn.Module | None  # SDXL's second text encoder, frozen; None for SD 1.x / 2.x
    tokenizer_2: Any
    trained: dict[str, nn.Module]  # "unet" (and "text_encoder") unwrapped: what the EMA follows and samples use
    wrapped: dict[str, nn.Module]  # the same as accelerate prepared them (DDP, FSDP2); forward passes use these
    skeletons: dict[str, nn.Module]  # under FSDP2, weightless copies taken before sharding; else {}
    optimizer: torch.optim.Optimizer  # as accelerate prepared it
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    emas: dict[str, EMA]  # per trained model, when EMA is on
    parameters: dict[str, nn.Parameter]  # the trained tensors, by the names checkpoints use

    @property
    def sharded(self) -> bool:
        return bool(self.skeletons)

    @property
    def names(self) -> dict[nn.Parameter, str]:
        return {p: name for name, p in self.parameters.items()}


@dataclass
class Progress:
    """Where the run stands: what a checkpoint records and a resume restores, and what the result reports."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next batch
    batch: int = 0  # index of the next batch within this rank's list of that epoch
    last_loss: float | None = None  # of the last optimizer step, averaged over its micro-batches and the processes
    checkpoint: Path | None = None  # the newest checkpoint of this run
    checkpoint_step: int = -1  # its step (-1: none yet)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An ``Accelerator`` for ``config``; under ``accelerate launch`` it picks up the launch settings."""
    # We never hand a DataLoader to accelerate (the rank split is ours, see BucketBatches), so
    # accumulation counts micro-batches instead of watching a data loader's end.
    plugin = GradientAccumulationPlugin(num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False)
    return Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_plugin=plugin)


def train(
    models: ModelSet,
    dataset: ImageCaptionDataset,
    config: TrainConfig,
    output_dir: str | Path,
    *,
    resume: str | None = None,
    accelerator: Accelerator | None = None,
    sample_fn: Callable[[SampleRequest], Any] = save_samples,
    show_progress: bool = True,
) -> TrainResult:
    """Train ``models.unet`` (and, with ``config.train_text_encoder``, the text encoder) on ``dataset``.

    Checkpoints go to ``output_dir/checkpoints`` (every ``checkpointing_steps`` and at the last step),
    the metrics log and samples beside them. Ctrl-C finishes the current step, saves a checkpoint and
    raises ``TrainingInterrupted`` (a ``KeyboardInterrupt``) naming it.
    ``resume`` is ``"latest"`` or a checkpoint folder. The models are modified in place (trained,
    LoRA-injected); the result holds the unwrapped, final ones. Saving them in a model format is the
    caller's job (``ldm.loading.save_diffusers``, ``ldm.adapters.training.save_lora``). accelerate keeps one state
    per process: later calls in the same process must use the same ``mixed_precision``.
    """
    run = set_up(models, dataset, config, Path(output_dir), accelerator or make_accelerator(config), resume)
    progress = resume_from(run, resume) if resume is not None else Progress()
    feed = data_feed(run)
    report = Report(run, progress.step, show_progress)
    losses: list[torch.Tensor] = []  # one per micro-batch of the optimizer step under way
    stopping = False  # Ctrl-C on any rank, seen at a step boundary
    with InterruptFlag() as interrupt:
        for batch in epochs(run, feed, progress):
            generator = step_generator(config.seed, run.accelerator.process_index, progress.step, len(losses))
            losses.append(micro_step(run, feed, batch, generator))
            if not run.accelerator.sync_gradients:
                continue  # accumulating: the optimizer has not stepped yet
            end_step(run, progress, losses)
            losses = []
            report.step(progress)
            if config.sample_every and progress.step % config.sample_every == 0:
                render_samples(run, sample_fn, progress.step)
            if checkpoint_due(config, progress.step):
                write_checkpoint(run, progress)
            stopping = interrupt.agreed(run.accelerator)
            if progress.step >= config.max_steps or stopping:
                break
    report.close()
    run.accelerator.wait_for_everyone()
    if stopping:
        if progress.checkpoint_step != progress.step:  # -1 without a checkpoint, and step >= 1 here
            write_checkpoint(run, progress)
        raise TrainingInterrupted(progress.step, progress.checkpoint)
    return final_result(run, progress)


def set_up(models: ModelSet, dataset: ImageCaptionDataset, config: TrainConfig, output_dir: Path,
           accelerator: Accelerator, resume: str | None) -> Run:
    """Stages 1 to 3, after refusing settings that cannot run together (before any model is touched)."""
    if resume is None and ckpt.list_checkpoints(output_dir):
        raise ConfigError(f"{output_dir} already holds checkpoints; pass --resume latest or choose another --output")
    if config.train_text_encoder and dataset.config.cache_text_embeddings:
        raise ConfigError("cached text embeddings need a frozen text encoder; drop one of the two settings")
    text_encoder_2, tokenizer_2 = sdxl_text(models)
    check_family(family_of(models.text_encoder, text_encoder_2), config)
    check_backend(accelerator, config.train_text_encoder)
    set_seed(config.seed)  # the same LoRA initialisation on every rank
    weight_dtype = DTYPES[config.mixed_precision]
    # Keys the model's config leaves out take DDPM's diffusers defaults, as diffusers' training scripts load a DDPMScheduler.
    scheduler = NoiseProcess.from_config(models.scheduler_config.filled_for(SCHEDULERS["ddpm"].DIFFUSERS_DEFAULTS))
    trained, text_encoder = freeze_and_adapt(models, text_encoder_2, config, accelerator.device, weight_dtype)
    optimizer, lr_scheduler = make_optimizer(config, trained)
    wrapped, optimizer, skeletons = hand_to_accelerate(accelerator, trained, optimizer)
    # After prepare: the EMA must have the layout of the parameters it follows (see ema.py).
    emas = {name: EMA(model, config.ema_decay) for name, model in trained.items()} if config.ema_decay else {}
    return Run(
        config=config, models=models, dataset=dataset, output_dir=output_dir, accelerator=accelerator,
        weight_dtype=weight_dtype, scheduler=scheduler, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, trained=trained, wrapped=wrapped,
        skeletons=skeletons, optimizer=optimizer, lr_scheduler=lr_scheduler, emas=emas, parameters=trainable_parameters(trained),
    )


def sdxl_text(models: ModelSet) -> tuple[nn.Module | None, Any]:
    """SDXL's second text encoder and tokenizer; (None, None) for a model set without them (an SD 1.x / 2.x set
    need not name them)."""
    return getattr(models, "text_encoder_2", None), getattr(models, "tokenizer_2", None)


def family_of(text_encoder: nn.Module | None, text_encoder_2: nn.Module | None) -> str:
    """The model set's family as ``ldm.loading`` names SDXL's (``sdxl``, ``sdxl-refiner``: bigG alone), else ``sd``."""
    if text_encoder is None:
        return "sdxl-refiner"
    return "sdxl" if text_encoder_2 is not None else "sd"


def check_family(family: str, config: TrainConfig, model: str = "the model") -> None:
    """SDXL trains its base model's U-Net (or a LoRA on it) with both text encoders frozen; its refiner is not trained.
    ``family``: ``ldm.loading``'s name for the model's (``ldm finetune`` checks it from the file, before loading)."""
    if family == "sdxl-refiner":
        raise ConfigError(f"{model} is an SDXL refiner; ldm finetune trains SD 1.x/2.x and SDXL base models")
    if family == "sdxl" and config.train_text_encoder:
        raise ConfigError("training SDXL's text encoders is not built; drop --train-text-encoder (the U-Net or its LoRA trains)")


def freeze_and_adapt(
    models: ModelSet, text_encoder_2: nn.Module | None, config: TrainConfig, device: torch.device, weight_dtype: torch.dtype
) -> tuple[dict[str, nn.Module], nn.Module]:
    """1. The models to train by name, on the device in training mode, and the text encoder (trained or not).

    Frozen parts are frozen explicitly, in the run's precision; LoRA freezes the base weights (kept in the run's
    precision too, as diffusers' LoRA scripts keep them) and trains adapters only, in fp32.
    """
    unet, vae, text_encoder = models.unet, models.vae, models.text_encoder
    vae.requires_grad_(False).eval().to(device, vae_dtype(vae, weight_dtype))
    if text_encoder_2 is not None:
        text_encoder_2.requires_grad_(False).eval().to(device, weight_dtype)
    unet.requires_grad_(not config.lora)
    text_encoder.requires_grad_(config.train_text_encoder and not config.lora)
    if config.lora:
        alpha = config.lora_alpha if config.lora_alpha is not None else float(config.lora_rank)
        unet = fp32_adapters(add_adapters(unet.to(device, weight_dtype), UNET_TARGETS, config.lora_rank, alpha))
        if config.train_text_encoder:
            text_encoder = text_encoder.to(device, weight_dtype)
            text_encoder = fp32_adapters(add_adapters(text_encoder, TEXT_ENCODER_TARGETS, config.lora_rank, alpha))
    trained = {"unet": unet}
    if config.train_text_encoder:
        trained["text_encoder"] = text_encoder
    else:
        text_encoder.eval().to(device, weight_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing(True)
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    for model in trained.values():
        model.to(device).train()  # fp32 master weights; autocast runs the maths in fp16/bf16
    return trained, text_encoder


def fp32_adapters(model: nn.Module) -> nn.Module:
    """The trainable (adapter) parameters in fp32 (peft makes them in the base layer's dtype): the optimizer's master
    weights, while autocast computes in the run's precision."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return model


def vae_dtype(vae: nn.Module, weight_dtype: torch.dtype) -> torch.dtype:
    """The frozen VAE's dtype: fp32 in an fp16 run where its config says fp16 overflows (SDXL's ``force_upcast``), as
    diffusers' SDXL training scripts keep it; else the run's weight dtype."""
    return torch.float32 if vae.config.force_upcast and weight_dtype == torch.float16 else weight_dtype


def make_optimizer(config: TrainConfig, trained: dict[str, nn.Module]) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """2. AdamW (Loshchilov & Hutter 2019) over the trainable parameters, and its warm-up + schedule."""
    groups = [{"params": [p for p in trained["unet"].parameters() if p.requires_grad], "lr": config.learning_rate}]
    if config.train_text_encoder:
        lr = config.text_encoder_learning_rate or config.learning_rate
        groups.append({"params": [p for p in trained["text_encoder"].parameters() if p.requires_grad], "lr": lr})
    optimizer = torch.optim.AdamW(
        groups, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay, eps=config.adam_epsilon
    )
    # Not passed to accelerate.prepare: its wrapper would step the schedule once per process.
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the learning rate after ``step`` optimizer steps: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if step < config.lr_warmup_steps:
            return (step + 1) / (config.lr_warmup_steps + 1)
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.lr_warmup_steps) / max(1, config.max_steps - config.lr_warmup_steps))
        if config.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def hand_to_accelerate(
    accelerator: Accelerator, trained: dict[str, nn.Module], optimizer: torch.optim.Optimizer
) -> tuple[dict[str, nn.Module], torch.optim.Optimizer, dict[str, nn.Module]]:
    """3. accelerate wraps the trained models (DDP or FSDP2 per the launch config) and the optimizer.

    Returns the wrapped models by name, the wrapped optimizer, and under FSDP2 the skeletons: FSDP2
    shards the modules in place, and a weightless copy taken before is what whole weights are put
    back into for samples and the result.
    """
    sharded = accelerator.distributed_type == DistributedType.FSDP
    skeletons = {name: meta_skeleton(model) for name, model in trained.items()} if sharded else {}
    prepared = accelerator.prepare(*trained.values(), optimizer)
    if sharded:
        check_units(trained["unet"])
    return dict(zip(trained, prepared[:-1])), prepared[-1], skeletons


def resume_from(run: Run, resume: str) -> Progress:
    """4. Weights, optimizer, schedule, EMA and RNG from a checkpoint; returns its step and data position."""
    path = ckpt.resolve_resume(run.output_dir, resume)
    state = ckpt.load_checkpoint(path)
    ckpt.check_compatible(state.settings, run.config.to_dict(), state.world_size, run.accelerator.num_processes)
    if set(state.trainable) != set(run.parameters):
        raise ConfigError(f"cannot resume: the tensors saved in {path} differ from the ones this run trains")
    load_parameters(run.parameters, state.trainable)
    if state.format_version == 1:  # written before sharding support: torch's positional layout
        if run.sharded:
            raise ConfigError(f"cannot resume {path} (checkpoint format 1) under FSDP; resume it without FSDP")
        run.optimizer.load_state_dict(state.optimizer)
    else:
        load_optimizer_state(run.optimizer, state.optimizer, run.names)
    run.lr_scheduler.load_state_dict(state.lr_scheduler)
    for name, ema in run.emas.items():
        if state.ema is None:
            raise ConfigError(f"cannot resume: {path} holds no EMA weights but EMA is on")
        ema.load_state_dict(split_prefixed(state.ema, name))
    ckpt.restore_rng(state.rng[run.accelerator.process_index])
    return Progress(step=state.step, epoch=state.epoch, batch=state.batch, checkpoint=path, checkpoint_step=state.step)


def split_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) + 1:]: value for key, value in tensors.items() if key.startswith(prefix + ".")}


@dataclass(frozen=True)
class Feed:
    """Where micro-batches come from: this rank's share of each epoch, and the encodings kept for reuse."""

    batches: BucketBatches
    source: ImageCaptionDataset  # without pixels when the latents are cached
    latents: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] | None  # (index, flipped) → VAE (mean, std)
    texts: dict[str, TextCondition] | None  # caption → its conditioning, filled on first use


def data_feed(run: Run) -> Feed:
    """5. The batches of this rank, the latents encoded up front and the text cache, as the data config asks."""
    dataset, config, accelerator = run.dataset, run.config, run.accelerator
    batches = BucketBatches(dataset.examples, config.batch_size, config.seed, accelerator.process_index, accelerator.num_processes)
    vae = run.models.vae
    latents = cache_latents(dataset, vae, accelerator.device, vae_dtype(vae, run.weight_dtype)) if dataset.config.cache_latents else None
    source = dataset.without_pixels() if latents is not None else dataset
    # SDXL's text encoders are always frozen: each caption is encoded once, not again at every step it is drawn.
    cache_texts = dataset.config.cache_text_embeddings or run.text_encoder_2 is not None
    return Feed(batches, source, latents, {} if cache_texts else None)


@torch.no_grad()
def cache_latents(dataset: ImageCaptionDataset, vae: nn.Module, device, dtype) -> dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]]:
    """Encode every image (and its mirror image when flipping is on) once: (index, flipped) → (mean, std)."""
    cache = {}
    flips = (False, True) if dataset.config.random_flip else (False,)
    for index in range(len(dataset)):
        for flip in flips:
            posterior = vae.encode(dataset.pixels(index, flip, 0.5)[None].to(device, dtype))
            cache[(index, flip)] = (posterior.mean[0].cpu(), posterior.std[0].cpu())
    return cache


def epochs(run: Run, feed: Feed, progress: Progress) -> Iterator[dict]:
    """Micro-batches from the data position in ``progress`` on, advancing it, until the last step is done."""
    config = run.config
    while progress.step < config.max_steps:
        loader = torch.utils.data.DataLoader(
            feed.source, batch_sampler=feed.batches.epoch(progress.epoch, progress.batch), collate_fn=collate,
            num_workers=config.num_workers, worker_init_fn=ignore_interrupts if config.num_workers else None,
        )
        for batch in loader:
            progress.batch += 1
            yield batch
        progress.epoch, progress.batch = progress.epoch + 1, 0


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The generator of one micro-batch's noise and timesteps; depends only on where it is in the run."""
    state = np.random.SeedSequence([seed, rank, step, micro]).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def micro_step(run: Run, feed: Feed, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Latents and text embeddings → noise, predict, loss (``objective.py``) → backward. The prepared
    optimizer steps (after clipping) only once accelerate has accumulated a whole step's gradients."""
    accelerator, config = run.accelerator, run.config
    with accelerator.accumulate(*run.wrapped.values()):
        latents = batch_latents(run, feed, batch, generator)
        text = batch_text(run, feed, batch["caption"])
        with accelerator.autocast():
            loss = diffusion_loss(
                run.wrapped["unet"], run.scheduler, latents, text.context, generator,
                noise_offset=config.noise_offset, min_snr_gamma=config.min_snr_gamma, added=text.added(batch["time_ids"]),
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(list(run.parameters.values()), config.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def batch_latents(run: Run, feed: Feed, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents z = scaling_factor * (mean + std * eps) of the batch's images (Rombach et al. 2022, sec. 4.3.2)."""
    device, vae = run.accelerator.device, run.models.vae
    if feed.latents is not None:
        keys = list(zip(batch["index"], batch["flipped"]))
        mean = torch.stack([feed.latents[key][0] for key in keys]).to(device)
        std = torch.stack([feed.latents[key][1] for key in keys]).to(device)
    else:
        with torch.no_grad():
            posterior = vae.encode(batch["pixels"].to(device, vae_dtype(vae, run.weight_dtype)))
        mean, std = posterior.mean, posterior.std
    eps = randn(tuple(mean.shape), generator, device, mean.dtype)
    return ((mean + std * eps) * vae.config.scaling_factor).float()


def batch_text(run: Run, feed: Feed, captions: list[str]) -> TextCondition:
    """The captions' conditioning (``captions.py``): through the (wrapped) encoder when it trains, else under no_grad,
    cached if asked."""
    device = run.accelerator.device
    if "text_encoder" in run.wrapped:
        return encode_captions(captions, caption_encoders(run, run.wrapped["text_encoder"]), device).float()
    encoders = caption_encoders(run, run.text_encoder)
    if feed.texts is None:
        with torch.no_grad():
            return encode_captions(captions, encoders, device).float()
    # One caption per pass: its numbers then do not depend on which batch met it first (a resumed run meets
    # them in other batches), and the cache lives in CPU memory, not the accelerator's.
    for caption in sorted({c for c in captions if c not in feed.texts}):
        with torch.no_grad():
            feed.texts[caption] = encode_captions([caption], encoders, device).row(0).to("cpu")
    return TextCondition.stack([feed.texts[c] for c in captions]).to(device).float()


def caption_encoders(run: Run, text_encoder: nn.Module) -> CaptionEncoders:
    return CaptionEncoders(run.models.tokenizer, text_encoder, run.tokenizer_2, run.text_encoder_2)


def end_step(run: Run, progress: Progress, losses: list[torch.Tensor]) -> None:
    """After an optimizer step: the schedule, the EMA, the count, and the step's loss (a collective:
    the mean over its micro-batches and all processes)."""
    run.lr_scheduler.step()
    for name, ema in run.emas.items():
        ema.update(run.trained[name])
    progress.step += 1
    progress.last_loss = run.accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()


class Report:
    """What a run shows as it goes: a progress bar with the loss and images per second, and (main
    process only) the metrics log."""

    def __init__(self, run: Run, first_step: int, show_progress: bool):
        config, main = run.config, run.accelerator.is_main_process
        self.run = run
        self.log = MetricsLog(run.output_dir, config.log_format, first_step=first_step) if main else None
        self.bar = tqdm(total=config.max_steps, initial=first_step, unit="step", disable=not (show_progress and main))
        self.images_per_step = config.batch_size * config.gradient_accumulation_steps * run.accelerator.num_processes
        self.first_step, self.started = first_step, time.perf_counter()

    def step(self, progress: Progress) -> None:
        elapsed = time.perf_counter() - self.started
        rate = (progress.step - self.first_step) * self.images_per_step / elapsed
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{progress.last_loss:.4f}", img_s=f"{rate:.2f}")
        if self.log is not None and progress.step % self.run.config.log_every == 0:
            lr = self.run.lr_scheduler.get_last_lr()[0]
            self.log.write({"step": progress.step, "epoch": progress.epoch, "loss": progress.last_loss, "lr": lr,
                            "images_per_second": rate, "elapsed_seconds": elapsed})

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()


def render_samples(run: Run, sample_fn: Callable[[SampleRequest], Any], step: int) -> None:
    """Sample images on the main process; under sharding every rank first helps gather the weights."""
    trained, text_encoder = run.trained, run.text_encoder
    if run.sharded:
        trained = whole_models(run.accelerator, trained, run.skeletons)
        text_encoder = trained.get("text_encoder", text_encoder)
    if not run.accelerator.is_main_process:
        return
    unet = trained["unet"]
    was_training = {name: model.training for name, model in trained.items()}
    unet.eval()
    text_encoder.eval()
    try:
        size = (run.dataset.config.resolution, run.dataset.config.resolution)
        config, models = run.config, run.models
        with run.accelerator.autocast():  # frozen parts are in the run's half precision, trained ones in fp32
            sample_fn(SampleRequest(
                unet=unet, vae=models.vae, text_encoder=text_encoder, tokenizer=models.tokenizer,
                text_encoder_2=run.text_encoder_2, tokenizer_2=run.tokenizer_2,
                scheduler_config=models.scheduler_config, prompts=config.sample_prompts, step=step, seed=config.seed,
                num_inference_steps=config.sample_steps, guidance_scale=config.sample_guidance_scale, size=size,
                defaults=GenerationDefaults(**models.generation_config),
                folder=run.output_dir / "samples",
            ))
    finally:
        for name, model in trained.items():
            model.train(was_training[name])


def whole_models(accelerator: Accelerator, trained: dict[str, nn.Module], skeletons: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Collective. On the main process: plain copies of sharded models with whole weights, on the
    accelerator's device; on the other ranks, which only help gather: {}."""
    main = accelerator.is_main_process
    whole = {name: gather_tensors(model.state_dict(), keep=main) for name, model in trained.items()}
    return {name: materialize(skeletons[name], state).to(accelerator.device) for name, state in whole.items()} if main else {}


def checkpoint_due(config: TrainConfig, step: int) -> bool:
    """Every ``checkpointing_steps`` and at the last step too: a finished run's final state is what a
    longer run continues from."""
    return bool(config.checkpointing_steps) and (step % config.checkpointing_steps == 0 or step == config.max_steps)


def write_checkpoint(run: Run, progress: Progress) -> None:
    """Collective: every rank gathers (sharded tensors need all ranks), the main process writes.
    The checkpoint becomes ``progress.checkpoint``."""
    accelerator = run.accelerator
    rng = gather_object([ckpt.capture_rng()])  # every rank's RNG, collected on all ranks
    trainable = gather_tensors(run.parameters, keep=accelerator.is_main_process)
    ema = {f"{name}.{key}": value for name, e in run.emas.items() for key, value in e.state_dict().items()} or None
    optimizer_state = gather_optimizer_state(run.optimizer, run.names)
    if accelerator.is_main_process:
        state = ckpt.TrainingState(
            step=progress.step, epoch=progress.epoch, batch=progress.batch, settings=run.config.to_dict(),
            world_size=accelerator.num_processes, trainable=trainable, ema=ema, optimizer=optimizer_state,
            lr_scheduler=run.lr_scheduler.state_dict(), rng=rng,
        )
        ckpt.save_checkpoint(run.output_dir, state, keep=run.config.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    progress.checkpoint, progress.checkpoint_step = ckpt.checkpoint_dir(run.output_dir, progress.step), progress.step


def final_result(run: Run, progress: Progress) -> TrainResult:
    """The trained models, unwrapped, with the EMA weights if EMA is on; collective under sharding."""
    accelerator = run.accelerator
    final = {name: accelerator.unwrap_model(model) for name, model in run.wrapped.items()}
    for name, ema in run.emas.items():
        ema.copy_to(final[name])
    if run.sharded:
        whole = whole_models(accelerator, final, run.skeletons)  # collective; {} on the other ranks
        final = whole if accelerator.is_main_process else final
    for model in final.values():
        model.eval()
    return TrainResult(
        unet=final["unet"],
        text_encoder=final.get("text_encoder", run.text_encoder),
        step=progress.step,
        last_loss=progress.last_loss,
        is_main_process=accelerator.is_main_process,
        checkpoint=progress.checkpoint if progress.checkpoint_step == progress.step else None,
    )
