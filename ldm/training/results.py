"""A run's result (``OUT/model`` or ``OUT/lora.safetensors``): kept in its last checkpoint, published beside it.

A run that ends on a checkpoint writes its result into that checkpoint first, then makes
``OUT/<result>`` a hard-linked copy of it (no second copy on disk). Continuing a finished run in its
own folder (``--resume latest --max-steps N``, N larger) replaces ``OUT/<result>`` with the longer
run's, atomically, while the shorter run's stays in its checkpoint, which checkpoint rotation never
deletes (``checkpoint.save_checkpoint``). Nothing else is ever replaced: a result that is not the
hard-linked twin of a checkpoint's is refused rather than overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ldm.errors import CheckpointError, ConfigError
from ldm.training import checkpoint as ckpt
from ldm.training.config import TrainConfig


def result_path(output_dir: Path, config: TrainConfig) -> Path:
    return Path(output_dir) / ("lora.safetensors" if config.lora else "model")


def check_output(output_dir: Path, target: Path, resume: str | None, config: TrainConfig) -> Path | None:
    """Refuse a run that would overwrite anything but its own superseded result; before any loading.

    Returns the checkpoint that keeps the result this run will supersede, or None.
    """
    output_dir = Path(output_dir)
    path = ckpt.resolve_resume(output_dir, resume) if resume is not None else None
    if path is not None and checkpoint_step(path) > config.max_steps:
        raise ConfigError(f"--resume {path} is at step {checkpoint_step(path)}, beyond --max-steps {config.max_steps}; raise --max-steps")
    if not target.exists():
        if path is None and ckpt.list_checkpoints(output_dir):
            raise ConfigError(f"{output_dir} already holds checkpoints; pass --resume latest or choose another --output")
        refuse_older(path, output_dir)
        return None
    if path is None:
        raise ConfigError(f"{target} already exists (the run is finished); continue it with --resume latest and a larger "
                          "--max-steps, or choose another --output")
    if path.parent.resolve() != (output_dir / "checkpoints").resolve():
        raise ConfigError(f"{target} already exists and --resume {resume} is not a checkpoint of its run; choose another --output")
    refuse_older(path, output_dir)
    keeper = keeping_checkpoint(output_dir, target)
    if keeper is None:
        raise ConfigError(f"{target} is kept in no checkpoint of {output_dir} (an older ldm wrote it); move it elsewhere, then continue")
    if config.checkpointing_steps is None:
        raise ConfigError("continuing a finished run needs checkpoints (its result is kept in the last one); drop --checkpointing-steps 0")
    if path == keeper and checkpoint_step(path) == config.max_steps:
        raise ConfigError(f"the run in {output_dir} finished at step {config.max_steps}; pass a larger --max-steps to continue it")
    return keeper


def refuse_older(path: Path | None, output_dir: Path) -> None:
    """A resumed run would reach the step of a newer checkpoint in its folder and have to overwrite it."""
    newer = [c for c in ckpt.list_checkpoints(output_dir) if path is not None and checkpoint_step(c) > checkpoint_step(path)]
    if newer:
        raise ConfigError(
            f"--resume {path.name} is older than {newer[-1].name} in {output_dir}; resume the newest (--resume latest), "
            f"or resume {path.name} into another --output"
        )


def checkpoint_step(path: Path) -> int:
    try:
        return int(json.loads((Path(path) / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"cannot read {path}/state.json ({error}); resume from another checkpoint") from None


def keeping_checkpoint(output_dir: Path, target: Path) -> Path | None:
    """The checkpoint whose copy of the result is ``target`` itself (the same files, hard-linked)."""
    for checkpoint in reversed(ckpt.list_checkpoints(output_dir)):
        if same_files(checkpoint / target.name, target):
            return checkpoint
    return None


def same_files(a: Path, b: Path) -> bool:
    if a.is_file() and b.is_file():
        return os.path.samefile(a, b)
    if not (a.is_dir() and b.is_dir()):
        return False
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(os.path.samefile(a / name, b / name) for name in files_a)


def save_result(target: Path, checkpoint: Path | None, save: Callable[[Path], Path]) -> Path:
    """Write the run's result with ``save(path)`` (atomic, never overwriting) and publish it at ``target``.

    ``checkpoint`` holds the state the result was taken from; when it belongs to this run's folder,
    the result is kept in it and ``target`` becomes a hard-linked copy, replacing a superseded result.
    """
    if checkpoint is None or Path(checkpoint).parent.resolve() != (target.parent / "checkpoints").resolve():
        return save(target)
    kept = Path(checkpoint) / target.name
    if not kept.exists():  # else an interrupted earlier publish of this same state wrote it already
        save(kept)
    return publish(kept, target)


def publish(source: Path, target: Path) -> Path:
    """Make ``target`` a hard-linked copy of ``source`` (a file or folder), replacing ``target`` atomically.

    The copy is built in a hidden staging folder beside ``target``. A file replaces a file in one
    rename; a folder cannot replace a folder that way, so the superseded one is first moved into the
    staging folder: a kill in between leaves no ``target`` (a rerun with --resume latest publishes
    again), never a mixed one.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        copy = staging / target.name
        if source.is_dir():
            shutil.copytree(source, copy, copy_function=link_or_copy)
        else:
            link_or_copy(source, copy)
        if copy.is_dir() and target.exists():
            target.rename(staging / "superseded")
        os.replace(copy, target)
    finally:
        shutil.rmtree(staging)
    return target


def link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """A hard link, or a copy where the file system has none."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
