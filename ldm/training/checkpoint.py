"""Full training state on disk, written atomically, so a killed run resumes exactly where it stopped.

A checkpoint is a folder ``<output>/checkpoints/checkpoint-<step>`` built in a hidden temporary
sibling and renamed into place (``ldm.io.atomic_write_dir``): a folder with that name is always
complete. It holds

    state.json            step, data position (epoch, batch), settings, world size
    trainable.safetensors the trained tensors ("unet.<param>", "text_encoder.<param>"; LoRA: adapters only)
    ema.safetensors       the EMA copy of the same tensors (when EMA is on)
    optimizer.pt          AdamW moments and step counts, keyed by the same names (whole tensors, so the
                          file does not depend on how FSDP2 sharded them)
    lr_scheduler.pt       the learning-rate schedule's position
    rng.pt                every rank's torch RNG states (CPU and CUDA), for dropout and anything else global

The noise, timesteps and data augmentations do not need saved RNG state: they are drawn from
generators seeded by (seed, rank, step) and (seed, epoch, image), so a resumed run redraws them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm.errors import CheckpointError, ConfigError
from ldm.io import atomic_write_dir

PREFIX = "checkpoint-"
# What a finished run keeps in its last checkpoint besides the state (see results.py); such a
# checkpoint is never deleted to honour a checkpoint limit, since it holds a result the user has.
RESULTS = ("model", "lora.safetensors")
FORMAT_VERSION = 2  # 2: optimizer state keyed by parameter name instead of position
READABLE_VERSIONS = (1, 2)  # format 1 (torch's positional optimizer state) resumes unsharded runs


@dataclass
class TrainingState:
    step: int  # optimizer steps done
    epoch: int  # epoch of the next batch
    batch: int  # index of the next batch within this rank's list of that epoch
    settings: dict  # TrainConfig.to_dict() of the run that wrote it
    world_size: int
    trainable: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict  # distributed.gather_optimizer_state()
    lr_scheduler: dict
    rng: list[dict[str, torch.Tensor]]  # one entry per rank
    format_version: int = FORMAT_VERSION


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{PREFIX}{step:06d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(output_dir: Path, resume: str) -> Path:
    """``"latest"`` → the newest checkpoint of ``output_dir``; anything else is a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"--resume latest: {output_dir}/checkpoints holds no checkpoint; start without --resume")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"--resume {resume} is not a checkpoint folder (no state.json); pass 'latest' or a checkpoint-N folder")
    return path


def capture_rng() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{index}"] = cuda_state
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[key] for key in sorted(k for k in state if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def holds_result(path: Path) -> bool:
    return any((path / name).exists() for name in RESULTS)


def save_checkpoint(output_dir: Path, state: TrainingState, keep: int | None = None) -> Path:
    """Write ``state`` as ``checkpoint-<step>`` atomically, then delete all but the newest ``keep``
    (not counting those that keep a finished run's result, which stay)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "epoch": state.epoch,
        "batch": state.batch,
        "world_size": state.world_size,
        "settings": state.settings,
    }

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.trainable.items()}, str(folder / "trainable.safetensors"))
        if state.ema is not None:
            save_file({k: v.contiguous() for k, v in state.ema.items()}, str(folder / "ema.safetensors"))
        torch.save(state.optimizer, folder / "optimizer.pt")
        torch.save(state.lr_scheduler, folder / "lr_scheduler.pt")
        torch.save(state.rng, folder / "rng.pt")
        # state.json last: its presence is what resolve_resume() checks on a user-given path.
        (folder / "state.json").write_text(json.dumps(meta, indent=2))

    path = atomic_write_dir(checkpoint_dir(output_dir, state.step), write)
    if keep is not None:
        for old in [c for c in list_checkpoints(output_dir) if not holds_result(c)][:-keep]:
            # Rename first so a kill during the deletion never leaves a half-deleted "complete" checkpoint.
            doomed = old.with_name(f".deleting-{old.name}")
            old.rename(doomed)
            shutil.rmtree(doomed)
    return path


def load_checkpoint(path: Path) -> TrainingState:
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise CheckpointError(f"{path} has checkpoint format {meta.get('format_version')}, this ldm reads {READABLE_VERSIONS}")
        ema_file = path / "ema.safetensors"
        return TrainingState(
            step=meta["step"],
            epoch=meta["epoch"],
            batch=meta["batch"],
            settings=meta["settings"],
            world_size=meta["world_size"],
            trainable=load_file(str(path / "trainable.safetensors")),
            ema=load_file(str(ema_file)) if ema_file.is_file() else None,
            optimizer=torch.load(path / "optimizer.pt", weights_only=True),
            lr_scheduler=torch.load(path / "lr_scheduler.pt", weights_only=True),
            rng=torch.load(path / "rng.pt", weights_only=True),
            format_version=meta["format_version"],
        )
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"cannot read checkpoint {path} ({error}); resume from another checkpoint") from None


# Settings that change what the next step computes; a resumed run must keep them.
MUST_MATCH = (
    "seed",
    "batch_size",
    "gradient_accumulation_steps",
    "train_text_encoder",
    "lora_rank",
    "lora_alpha",
    "ema_decay",
    "min_snr_gamma",
    "noise_offset",
    "learning_rate",
    "text_encoder_learning_rate",
    "lr_schedule",
    "lr_warmup_steps",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "weight_decay",
    "max_grad_norm",
)
# Schedules whose learning rate at a step depends on max_steps: a run resumed with another
# max_steps would not be a run of that many steps.
DECAYING_SCHEDULES = ("linear", "cosine")


def check_compatible(saved: dict, current: dict, saved_world: int, current_world: int) -> None:
    """Refuse to resume with settings that would make the continuation differ from an uninterrupted run."""
    changed = [name for name in MUST_MATCH if saved.get(name) != current.get(name)]
    if changed:
        name = changed[0]
        raise ConfigError(f"cannot resume: {name} was {saved.get(name)!r}, now {current.get(name)!r}; use the original value")
    if current.get("lr_schedule") in DECAYING_SCHEDULES and saved.get("max_steps") != current.get("max_steps"):
        raise ConfigError(
            f"cannot resume: the {current['lr_schedule']} learning-rate schedule was laid out for {saved.get('max_steps')} "
            f"steps and would change at every step for {current.get('max_steps')}; keep max_steps {saved.get('max_steps')} "
            "or train with the constant schedule"
        )
    if saved_world != current_world:
        raise ConfigError(f"cannot resume: the checkpoint was written by {saved_world} processes, this run has {current_world}")
