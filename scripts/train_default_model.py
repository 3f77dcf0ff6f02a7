"""Train ldm-shapes, the project's default text-to-image model, from scratch on a CPU.

    python scripts/train_default_model.py                          # configs/ldm-shapes.json -> weights/ldm-shapes
    python scripts/train_default_model.py --config configs/ldm-shapes.json --work-dir runs/ldm-shapes --out DIR

Stages, each checkpointed in --work-dir so a killed run resumes where it stopped:
1. data     captioned images from ``support.shapes`` (train split: the held-out colour-shape pairs never occur)
2. vae      a KL autoencoder with SD's structure (factor 8, 4 latent channels), trained with an L1
            reconstruction loss plus a small KL term (Kingma & Welling 2014; Rombach et al. 2022, sec. 3.1)
3. latents  every image encoded once; the latent scaling factor is 1 / std of the latents
            (Rombach et al. 2022, sec. 4.3.2), written into the VAE config as SD does
4. unet     a CLIP-architecture text encoder and a cross-attention U-Net trained together from scratch
            on the cached latents with ldm.training's denoising objective; captions are dropped
            (replaced by "") with a small probability so classifier-free guidance works (Ho & Salimans 2022)
5. export   the diffusers folder layout (loads in ldm and in diffusers' StableDiffusionPipeline)
            plus training.json with the settings, losses and wall time of every stage
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.errors import ConfigError
from ldm.io import atomic_write
from ldm.loading import Components, save_diffusers
from ldm.models import AutoencoderKL, UNet, UNetConfig, VAEConfig
from ldm.models.text_encoder import TOKENIZER_DIR, load_tokenizer
from ldm.schedulers import SchedulerConfig
from ldm.training.checkpoint import list_checkpoints
from ldm.training.config import DataConfig, TrainConfig
from ldm.training.data import ImageCaptionDataset, scan_folder
from ldm.training.loop import train

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # support/ (the shapes dataset and scorer) is in the checkout, not installed
from support.shapes import generate, parse_caption, random_sample  # noqa: E402
from support.shapes_score import accuracy, analyze, expected  # noqa: E402


@dataclass(frozen=True)
class VAEStage:
    steps: int = 1500
    batch_size: int = 16
    learning_rate: float = 1e-3
    kl_weight: float = 1e-6  # on the KL summed over the latent, relative to the L1 summed over the pixels (LDM's convention)
    initial_logvar: float = 0.0  # start of the posterior's log-variance: the tiny KL weight drives it far below 0 anyway,
    # and starting there spares the early steps a decoder fed mostly noise (std 1 around means near 0)
    crop: int = 32  # side of the random crops of the first crop_steps steps (cheap: the VAE is convolutional) ...
    crop_steps: int = 0  # ... after which it trains on whole images, whose GroupNorm and attention statistics it must match
    decay_steps: int = 0  # the last decay_steps steps lower the learning rate to 10 % (half cosine) to settle the edges


@dataclass(frozen=True)
class DiffusionStage:
    steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 5e-4
    warmup_steps: int = 200  # linear ramp, then constant: a longer run continues a shorter one exactly (EMA averages)
    weight_decay: float = 0.01
    caption_dropout: float = 0.1  # probability of the empty caption, the unconditional branch of guidance
    ema_decay: float = 0.999  # the shipped weights are the moving average
    min_snr_gamma: float | None = 5.0  # Min-SNR-gamma weighting (Hang et al. 2023): faster convergence from scratch


@dataclass(frozen=True)
class TextEncoderShape:
    """CLIP text-tower hyper-parameters; the vocabulary is always the shipped 49,408-token CLIP BPE."""

    hidden_size: int = 64
    intermediate_size: int = 256
    num_attention_heads: int = 2
    num_hidden_layers: int = 3

    def clip_config(self) -> CLIPTextConfig:
        # SD 1.x conventions (quick_gelu, <|endoftext|> padding, last layer as conditioning) at a small width.
        return CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=self.hidden_size,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            **dataclasses.asdict(self),
        )


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained model; stored in configs/*.json and in training.json."""

    name: str = "ldm-shapes"
    resolution: int = 64  # image side in pixels; latents are resolution / 8
    samples: int = 10000  # training images (train split of support.shapes)
    seed: int = 0  # data stream, initialisation, batches and noise
    checkpoint_every: int = 200  # optimizer steps between resumable checkpoints
    eval_prompts: int = 64  # captions scored at the end of training (training.json); the benchmark does the full grid
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderShape = field(default_factory=TextEncoderShape)
    vae_training: VAEStage = field(default_factory=VAEStage)
    diffusion_training: DiffusionStage = field(default_factory=DiffusionStage)

    @classmethod
    def from_json(cls, path: Path) -> Recipe:
        values = json.loads(Path(path).read_text())
        parts = {
            "vae": VAEConfig,
            "unet": UNetConfig,
            "text_encoder": TextEncoderShape,
            "vae_training": VAEStage,
            "diffusion_training": DiffusionStage,
        }
        try:
            built = {k: _build(parts[k], v) if k in parts else v for k, v in values.items()}
            return cls(**built)
        except TypeError as error:
            raise ConfigError(f"{path}: {error}; compare with configs/ldm-shapes.json") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(kind, values: dict):
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The generator of one optimizer step: a resumed run draws the same batches and noise."""
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + stage) * 10_000_019 + step)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def save_state(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True)


def load_state(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.exists() else None


# ---------------------------------------------------------------------------------------------- stage 1: data
def make_data(recipe: Recipe, folder: Path) -> np.ndarray:
    """The training images as (N, H, W, 3) uint8, also written as PNG + caption files for ldm.training."""
    samples = generate(recipe.samples, recipe.seed, recipe.resolution, split="train")
    done = folder / "complete"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for i, sample in enumerate(samples):
            Image.fromarray(sample.image).save(folder / f"{i:06d}.png")
            (folder / f"{i:06d}.txt").write_text(sample.caption + "\n")
        done.write_text(f"{len(samples)}\n")
    return np.stack([s.image for s in samples])


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------- stage 2: VAE
def vae_loss(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator, kl_weight: float):
    posterior = vae.encode(images)
    reconstruction = vae.decode(posterior.sample(generator))
    l1 = (reconstruction - images).abs().mean()
    # LDM sums both terms per image; dividing both by the pixel count keeps their ratio.
    kl = 0.5 * (posterior.mean**2 + posterior.std**2 - 1.0 - posterior.logvar).flatten(1).sum(1).mean()
    return l1 + kl_weight * kl / images[0].numel(), l1


def train_vae(recipe: Recipe, images: np.ndarray, work: Path) -> tuple[AutoencoderKL, dict]:
    stage = recipe.vae_training
    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(recipe.vae)
    with torch.no_grad():  # quant_conv's output is (mean, logvar) per latent channel
        vae.quant_conv.bias[recipe.vae.latent_channels :] += stage.initial_logvar
    optimizer = torch.optim.AdamW(vae.parameters(), lr=stage.learning_rate, weight_decay=0.0)
    state = load_state(work / "vae.ckpt")
    start, history = 0, {"l1": [], "seconds": 0.0}
    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        log(f"vae: resuming at step {start}")
    vae.train()
    began, running = time.time() - history["seconds"], []
    for step in range(start, stage.steps):
        generator = step_generator(recipe.seed, 2, step)
        index = torch.randint(0, len(images), (stage.batch_size,), generator=generator).numpy()
        for group in optimizer.param_groups:
            group["lr"] = vae_lr(step, stage)
        side = stage.crop if step < stage.crop_steps else images.shape[1]
        top, left = torch.randint(0, images.shape[1] - side + 1, (2,), generator=generator).tolist()
        batch = to_pixels(images[index, top : top + side, left : left + side])
        loss, l1 = vae_loss(vae, batch, generator, stage.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        running.append(l1.item())
        if (step + 1) % 50 == 0:
            history["l1"].append((step + 1, float(np.mean(running))))
            log(f"vae step {step + 1}/{stage.steps} l1 {np.mean(running):.4f}")
            running = []
        if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == stage.steps:
            history["seconds"] = time.time() - began
            state = {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1, "history": history}
            save_state(work / "vae.ckpt", state)
    history["seconds"] = time.time() - began
    return vae.eval(), history


def vae_lr(step: int, stage: VAEStage) -> float:
    """Constant, then a half cosine from 100 % to 10 % over the last ``decay_steps`` steps."""
    into = step - (stage.steps - stage.decay_steps)
    if into < 0:
        return stage.learning_rate
    return stage.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * into / stage.decay_steps)))


@torch.no_grad()
def latent_scaling(vae: AutoencoderKL, images: np.ndarray, generator: torch.Generator) -> float:
    """1 / std of sampled latents, so the diffusion model sees unit-variance inputs (Rombach et al. 2022, sec. 4.3.2)."""
    posterior = vae.encode(to_pixels(images))
    return float(1.0 / posterior.sample(generator).std())


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, recipe: Recipe, count: int = 200) -> dict[str, float]:
    """Scorer accuracy on VAE reconstructions of fresh images: the ceiling the U-Net can reach."""
    samples = generate(count, recipe.seed + 1, recipe.resolution, split="all")
    decoded = vae.decode(vae.encode(to_pixels(np.stack([s.image for s in samples]))).mode())
    readings = [analyze(image) for image in to_uint8(decoded)]
    return accuracy(readings, [expected(s.scene) for s in samples])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------- stage 3: text encoder + U-Net
def train_denoiser(recipe: Recipe, vae: AutoencoderKL, data: Path, work: Path) -> tuple[Components, dict]:
    """ldm.training's loop (the one behind ``ldm finetune``), on networks freshly built from the recipe."""
    stage = recipe.diffusion_training
    data_config = DataConfig(
        resolution=recipe.resolution, buckets=False, caption_dropout=stage.caption_dropout, cache_latents=True
    )
    dataset = ImageCaptionDataset(scan_folder(data, data_config), data_config, seed=recipe.seed)
    config = TrainConfig(
        max_steps=stage.steps,
        batch_size=stage.batch_size,
        learning_rate=stage.learning_rate,
        lr_warmup_steps=stage.warmup_steps,
        lr_schedule="constant",
        weight_decay=stage.weight_decay,
        ema_decay=stage.ema_decay,
        min_snr_gamma=stage.min_snr_gamma,
        seed=recipe.seed,
        train_text_encoder=True,
        checkpointing_steps=recipe.checkpoint_every,
        checkpoints_total_limit=2,
        log_every=50,
    )
    torch.manual_seed(recipe.seed + 1)
    components = Components(
        unet=UNet(recipe.unet),
        vae=vae,
        text_encoder=CLIPTextModel(recipe.text_encoder.clip_config()),
        tokenizer=load_tokenizer("sd1"),
        scheduler_config=SchedulerConfig(),
        family="sd1",
        source=work,
    )
    output = work / "denoiser"
    resume = "latest" if list_checkpoints(output) else None
    began = time.time()
    result = train(components, dataset, config, output, resume=resume, show_progress=False)
    trained = dataclasses.replace(components, unet=result.unet, text_encoder=result.text_encoder)
    seconds, losses = loop_history(output / "log.csv")
    return trained, {"seconds": seconds, "steps": result.step, "last_loss": result.last_loss, "loss": losses,
                     "seconds_this_process": time.time() - began}


def loop_history(log_csv: Path) -> tuple[float, list[tuple[int, float]]]:
    """Training seconds over every (resumed) process of the loop, and the logged losses, from its log.csv.

    Each process's ``elapsed_seconds`` restarts at 0, so the total is the sum of each run's last value.
    """
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    total, previous = 0.0, 0.0
    for row in rows:
        elapsed = float(row["elapsed_seconds"])
        if elapsed < previous:
            total += previous
        previous = elapsed
    return total + previous, [(int(row["step"]), round(float(row["loss"]), 5)) for row in rows]


@torch.no_grad()
def adherence(model: Components, recipe: Recipe, guidance: float) -> dict[str, float]:
    """Scorer accuracy at 20 guided DPM-Solver++ steps on ``count`` training-distribution captions."""
    from ldm.pipeline import Pipeline

    pipe = Pipeline(model.unet, model.vae, model.text_encoder, model.tokenizer, model.scheduler_config)
    samples = [random_sample(recipe.seed + 2, i, recipe.resolution, split="train") for i in range(recipe.eval_prompts)]
    prompts = [s.caption for s in samples]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=guidance, scheduler="dpm-solver++", seed=0).images
    readings = [analyze(np.asarray(image)) for image in images]
    return accuracy(readings, [parse_caption(s.caption) for s in samples])


def best_guidance(by_guidance: dict[float, dict[str, float]]) -> float:
    """The guidance scale with the best mean accuracy on background, shape colour and shape class."""
    return max(by_guidance, key=lambda g: sum(by_guidance[g][k] for k in ("background", "color", "shape")))


# ---------------------------------------------------------------------------------------------- stage 4: export
def export(folder: Path, model: Components, record: dict) -> None:
    """The diffusers layout (ldm.loading.save_diffusers) plus training.json and generation_config.json.

    generation_config.json holds the recommended guidance scale, the default of ``ldm txt2img`` and
    ``Pipeline`` calls with this model (SD's 7.5 over-saturates a model this small).

    The tokenizer folder also gets the shipped vocab.json and merges.txt, which transformers 4
    needs beside the tokenizer.json that transformers 5 writes.
    """
    save_diffusers(model, folder)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / "tokenizer" / name).exists():
            shutil.copy2(TOKENIZER_DIR / name, folder / "tokenizer" / name)
    atomic_write(folder / "training.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    defaults = {"guidance_scale": record["recommended_guidance_scale"]}
    atomic_write(folder / "generation_config.json", lambda tmp: tmp.write_text(json.dumps(defaults, indent=2) + "\n"))


def snapshot(work: Path, recipe: Recipe) -> tuple[Path, Recipe]:
    """A copy of ``work`` frozen at its newest U-Net checkpoint, and the recipe that stops there.

    The copy keeps a running training undisturbed; training on the copy with ``steps`` set to the
    checkpoint's step resumes, finds nothing left to do, and exports.
    """
    checkpoints = list_checkpoints(work / "denoiser")
    if not (work / "vae.ckpt").is_file() or not checkpoints:
        raise ConfigError(f"{work} holds no VAE and U-Net checkpoints yet; train first, then take a snapshot")
    step = int(checkpoints[-1].name.split("-")[-1])
    frozen = work.parent / f"{work.name}-snapshot-{step}"
    if not frozen.exists():
        (frozen / "denoiser" / "checkpoints").mkdir(parents=True)
        shutil.copy2(work / "vae.ckpt", frozen / "vae.ckpt")
        (frozen / "data").symlink_to((work / "data").resolve())
        shutil.copytree(checkpoints[-1], frozen / "denoiser" / "checkpoints" / checkpoints[-1].name)
        shutil.copy2(work / "denoiser" / "log.csv", frozen / "denoiser" / "log.csv")
    log(f"snapshot of {work} at U-Net step {step} in {frozen}")
    return frozen, dataclasses.replace(recipe, diffusion_training=dataclasses.replace(recipe.diffusion_training, steps=step))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "ldm-shapes.json")
    parser.add_argument("--work-dir", type=Path, default=None, help="checkpoints and caches (default runs/<name>)")
    parser.add_argument("--out", type=Path, default=None, help="model folder to create (default weights/<name>)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--snapshot", action="store_true", help="export the newest U-Net checkpoint of --work-dir (e.g. of a run still training)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        # On a CPU shared with other jobs, fewer threads than cores avoids OpenMP spin-wait contention.
        torch.set_num_threads(args.threads)
    recipe = Recipe.from_json(args.config)
    work = args.work_dir or REPO / "runs" / recipe.name
    out = args.out or REPO / "weights" / recipe.name
    if out.exists():
        raise SystemExit(f"{out} already exists; pass --out to write the model elsewhere")
    if args.snapshot:
        work, recipe = snapshot(work, recipe)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write(work / "recipe.json", lambda tmp: tmp.write_text(json.dumps(recipe.to_dict(), indent=2)), overwrite=True)
    record: dict = {"recipe": recipe.to_dict(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    seconds: dict[str, float] = {}

    began = time.time()
    images = make_data(recipe, work / "data")
    seconds["data"] = time.time() - began
    log(f"data: {len(images)} images in {seconds['data']:.0f} s")

    vae, vae_history = train_vae(recipe, images, work)
    seconds["vae"] = vae_history["seconds"]
    scaling = latent_scaling(vae, images[:2000], torch.Generator().manual_seed(recipe.seed))
    vae_config = dataclasses.replace(recipe.vae, scaling_factor=round(scaling, 5), sample_size=recipe.resolution)
    trained_vae = AutoencoderKL(vae_config)
    trained_vae.load_state_dict(vae.state_dict())
    vae = trained_vae.eval()
    record["vae_reconstruction_accuracy"] = reconstruction_accuracy(vae, recipe)
    log(f"vae: scaling factor {vae_config.scaling_factor}, reconstructions read as {record['vae_reconstruction_accuracy']}")

    model, denoiser = train_denoiser(recipe, vae, work / "data", work)
    seconds["unet_and_text_encoder"] = denoiser["seconds"]
    record["adherence_20_steps_by_guidance"] = {g: adherence(model, recipe, g) for g in (1.0, 3.0, 7.0)}
    log(f"adherence at 20 dpm-solver++ steps by guidance: {record['adherence_20_steps_by_guidance']}")
    record["recommended_guidance_scale"] = best_guidance(record["adherence_20_steps_by_guidance"])

    record.update(
        scaling_factor=vae_config.scaling_factor,
        vae_l1=vae_history["l1"],
        denoiser=denoiser,
        seconds=seconds,
        total_seconds=sum(seconds.values()),
    )
    export(out, model, record)
    log(f"wrote {out} (training took {sum(seconds.values()) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
