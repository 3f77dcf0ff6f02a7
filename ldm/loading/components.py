"""The loaded model parts, and the one routine that puts file tensors into a network.

Networks are built on the meta device (no memory, no random init), every tensor
is read once, converted straight to the target dtype and device, and handed
over as the network's own parameters (``assign_state``, as ``load_state_dict(strict=True,
assign=True)``): peak memory while loading is about the size of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import CLIPTextConfig, CLIPTokenizer

from ldm import paging
from ldm.errors import CheckpointError, ConfigError
from ldm.loading.keymap import Entry, check_shape, describe_key_mismatch, to_diffusers
from ldm.models import AutoencoderKL, UNet, UNetConfig, VAEConfig
from ldm.models.text_encoder import ENCODERS, is_tokenizer_folder, load_tokenizer, load_tokenizer_2
from ldm.schedulers import SchedulerConfig

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

Family = Literal["sd1", "sd2", "sdxl", "sdxl-refiner"]

RELEASE_BYTES = 256 * 2**20  # converted sources whose file pages go back to the page cache at once (_read_converted)
CONVERT_CHUNK = 2**19  # elements an fp16 <-> bf16 conversion passes through fp32 at a time (convert_copy)


@dataclass
class Components:
    """Everything a text-to-image pipeline needs, as loaded from one model.

    SDXL models also have ``text_encoder_2`` (OpenCLIP bigG with its projection) and ``tokenizer_2``; the
    SDXL refiner has them alone (``text_encoder`` and ``tokenizer`` are None), as diffusers' pipelines.
    """

    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | None
    tokenizer: CLIPTokenizer | None
    scheduler_config: SchedulerConfig
    family: Family
    source: Path
    # The model's generation_config.json (ldm.settings.GenerationDefaults), kept so a copy
    # recommends what the original does; empty when the model recommends nothing.
    generation_config: dict[str, Any] = field(default_factory=dict)
    name: str | None = None  # the name the model records for itself; None: named after its folder or file
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL's; None for SD 1.x / 2.x
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def text_encoders(self) -> tuple[CLIPTextModel | CLIPTextModelWithProjection, ...]:
        """The text encoders the model has, in diffusers' order."""
        return tuple(encoder for encoder in (self.text_encoder, self.text_encoder_2) if encoder is not None)


# Calls that only write values into an existing tensor: the random and constant initialisers
# of torch.nn.init that dispatch on their argument, and the in-place tensor writes that the
# other initialisers end in. On a meta tensor they change nothing (it holds no values).
_VALUE_WRITES = frozenset(
    {
        nn.init.kaiming_uniform_,
        nn.init.uniform_,
        nn.init.normal_,
        nn.init.constant_,
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
        torch.Tensor.fill_,
        torch.Tensor.zero_,
    }
)


class _NoValueWritesOnMeta(TorchFunctionMode):
    """Skips ``_VALUE_WRITES`` whose target is a meta tensor.

    Building on the meta device still runs every module's ``reset_parameters``, whose meta
    kernels are Python decompositions: for SD 1.5 they are about half the build time. Skipping
    them leaves the same modules, parameters, shapes and dtypes. A torch function mode acts on
    the current thread only; nothing global is patched.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VALUE_WRITES:
            target = args[0] if args else kwargs["tensor"]
            if target.is_meta:
                return target
        return func(*args, **kwargs)


def build_networks(
    unet: UNetConfig, vae: VAEConfig, text: CLIPTextConfig | None
) -> tuple[UNet, AutoencoderKL, CLIPTextModel | None]:
    """The three networks, on the meta device (weights come later); no text encoder where ``text`` is None."""
    # transformers' CLIP modelling code adds memory and a noticeable start-up time to a process that
    # imports it, so it is imported only where a text encoder is built: VAE-only work never pays it.
    from transformers import CLIPTextModel

    with torch.device("meta"), _NoValueWritesOnMeta():
        return UNet(unet), AutoencoderKL(vae), None if text is None else CLIPTextModel(text)


def build_text_encoder_2(text_2: CLIPTextConfig | None) -> CLIPTextModelWithProjection | None:
    """SDXL's second text encoder (a CLIP text model with its projection), on the meta device; None without a config."""
    from transformers import CLIPTextModelWithProjection

    if text_2 is None:
        return None
    with torch.device("meta"), _NoValueWritesOnMeta():
        return CLIPTextModelWithProjection(text_2)


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def target_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Floating-point tensors take the requested dtype; integer buffers keep theirs."""
    return dtype if tensor.is_floating_point() else tensor.dtype


def load_entries(
    model: nn.Module,
    entries: list[Entry],
    file_shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str], torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    where: str,
    optional: Mapping[str, tuple[int, ...] | None] | None = None,
) -> None:
    """Check keys and shapes of ``file_shapes`` against ``entries``, then assign every tensor.

    ``optional`` are keys the file may hold that the network does not use (checked for shape
    when the expected shape is given, then skipped). All checks run before any tensor is read.
    """
    optional = optional or {}
    expected = {entry.original for entry in entries}
    missing = sorted(expected - file_shapes.keys())
    unexpected = sorted(file_shapes.keys() - expected - optional.keys())
    if missing or unexpected:
        raise CheckpointError(describe_key_mismatch(missing, unexpected, where))
    for key, shape in optional.items():
        if key in file_shapes and shape is not None and tuple(file_shapes[key]) != shape:
            raise CheckpointError(
                f"shape mismatch for {key}: the file has {list(file_shapes[key])}, the model needs {list(shape)}"
            )
    for entry in entries:
        check_shape(entry, file_shapes[entry.original])
    model_shapes = shapes_of(model)
    state = {}
    for entry, tensor in _read_converted(entries, read, device, dtype):
        state.update(to_diffusers(entry, tensor, model_shapes))
    assign_state(model, state, model_shapes, where)


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """``model.load_state_dict(state, strict=True, assign=True)``, ``shapes`` being the model's state dict's shapes:
    every key given once, in its shape; each tensor becomes the parameter or buffer itself, a parameter keeping
    its ``requires_grad``.

    torch's version passes every module through its load hooks and a Python call per module and tensor. Where no
    module has hooks or its own loading (``_plain``: ldm's networks, transformers' CLIP text models), the tensors
    go straight into the modules' tables, as accelerate's ``set_module_tensor_to_device`` puts them; the name is
    already a parameter or buffer there (``shapes``), so ``Module.__setattr__``'s checks have nothing to find.
    """
    missing, unexpected = sorted(shapes.keys() - state.keys()), sorted(state.keys() - shapes.keys())
    if missing or unexpected:
        raise CheckpointError(describe_key_mismatch(missing, unexpected, where))
    for key, tensor in state.items():
        if tuple(tensor.shape) != shapes[key]:
            raise CheckpointError(
                f"shape mismatch for {key} in {where}: {list(tensor.shape)}, the model needs {list(shapes[key])}"
            )
    if not all(_plain(module) for module in model.modules()):
        model.load_state_dict(state, strict=True, assign=True)
        return
    modules = dict(model.named_modules(remove_duplicate=False))
    for key, tensor in state.items():
        path, _, name = key.rpartition(".")
        owner = modules[path]
        if name in owner._parameters:
            owner._parameters[name] = nn.Parameter(tensor, requires_grad=owner._parameters[name].requires_grad)
        else:
            owner._buffers[name] = tensor


def _plain(module: nn.Module) -> bool:
    """Whether loading ``module``'s state is only assigning its tensors: no load hooks, no loading or extra state
    of its own (BatchNorm's, say)."""
    kind = type(module)
    return (
        not module._load_state_dict_pre_hooks
        and not module._load_state_dict_post_hooks
        and kind._load_from_state_dict is nn.Module._load_from_state_dict
        and kind.get_extra_state is nn.Module.get_extra_state
    )


def _read_converted(
    entries: list[Entry], read: Callable[[str], torch.Tensor], device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[Entry, torch.Tensor]]:
    """Each entry's tensor on ``device`` in ``dtype``. A converted tensor is a copy, and the pages of the memory-mapped
    file that its source read stay resident while the file's mapping lives: they are handed back to the page cache
    every ``RELEASE_BYTES`` of sources (``paging.release_tensors``), so that converting a model (an fp16 file run in
    fp32 or bf16) does not also hold the file's pages."""
    sources, size = [], 0
    buffer = torch.empty(CONVERT_CHUNK, dtype=torch.float32)
    for entry in entries:
        source = read(entry.original)
        tensor = converted(source, device, target_dtype(source, dtype), buffer)
        if tensor is not source:
            sources.append(source)
            size += source.nbytes
        if size >= RELEASE_BYTES:
            paging.release_tensors(sources)
            sources, size = [], 0
        yield entry, tensor
    paging.release_tensors(sources)


def converted(source: torch.Tensor, device: torch.device, dtype: torch.dtype, buffer: torch.Tensor) -> torch.Tensor:
    """``source.to(device=device, dtype=dtype)``, the same values; a conversion between fp16 and bf16 on the CPU
    passes through ``buffer`` (``convert_copy``)."""
    sixteen = {torch.float16, torch.bfloat16}
    if {source.dtype, dtype} != sixteen or device.type != "cpu" or source.device != device:
        return source.to(device=device, dtype=dtype)
    return convert_copy(torch.empty(source.shape, dtype=dtype, device=device), source.contiguous(), buffer)


def convert_copy(target: torch.Tensor, source: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``target.copy_(source)`` for two contiguous 16-bit float tensors of one shape (fp16 and bf16), a
    ``buffer``'s length at a time through that small fp32 buffer.

    torch converts fp16 to bf16 one element at a time through fp32; its two vectorised conversions, to fp32 and
    back, are faster together. Every fp16 and bf16 value is exact in fp32, so every number comes out as the direct
    conversion's, bit for bit (one rounding, to nearest even); a NaN stays a NaN, with another payload.
    """
    flat_target, flat_source = target.view(-1), source.view(-1)
    for begin in range(0, flat_source.numel(), len(buffer)):
        chunk = buffer[: min(len(buffer), flat_source.numel() - begin)]
        chunk.copy_(flat_source[begin : begin + len(chunk)])
        flat_target[begin : begin + len(chunk)].copy_(chunk)
    return target


def finish_text_encoder(text_encoder: CLIPTextModel | CLIPTextModelWithProjection, device: torch.device) -> None:
    """Recreate the non-persistent buffers a meta-built CLIP text model still lacks.

    transformers registers ``embeddings.position_ids`` (0..max_positions-1) as a non-persistent
    buffer, so no state dict carries it and ``assign=True`` leaves it on the meta device.
    CLIPTextModelWithProjection keeps the text tower in ``text_model``.
    """
    from transformers import CLIPTextModelWithProjection

    tower = text_encoder.text_model if isinstance(text_encoder, CLIPTextModelWithProjection) else text_encoder
    positions = text_encoder.config.max_position_embeddings
    tower.embeddings.position_ids = torch.arange(positions, device=device).expand(1, -1)
    for name, tensor in [*text_encoder.named_parameters(), *text_encoder.named_buffers()]:
        if tensor.is_meta:
            raise RuntimeError(f"text encoder tensor {name} was not loaded")


def finish(
    unet: UNet,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel | None,
    device: torch.device,
    text_encoder_2: CLIPTextModelWithProjection | None = None,
) -> None:
    """Put the loaded networks in eval mode and make sure nothing stayed on the meta device."""
    encoders = [encoder for encoder in (text_encoder, text_encoder_2) if encoder is not None]
    for encoder in encoders:
        finish_text_encoder(encoder, device)
    for name, model in (("U-Net", unet), ("VAE", vae)):
        for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_meta:
                raise RuntimeError(f"{name} tensor {key} was not loaded")
    for model in (unet, vae, *encoders):
        model.eval()


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"fp16"``/``"float16"``/``torch.float16`` -> ``torch.float16`` (and bf16, fp32)."""
    if isinstance(name, torch.dtype):
        return name
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}; choose one of fp32, fp16, bf16")
    return table[name]


def resolve_tokenizer(
    tokenizer: str | Path | CLIPTokenizer | None, family: Family, model_folder: Path | None = None
) -> CLIPTokenizer | None:
    """The tokenizer to use: an explicit one, the model folder's, or the shipped one for ``family``; None for a
    family without a (first) tokenizer (the SDXL refiner), which takes no explicit one either.

    A folder may hold ``tokenizer.json`` (transformers 5) or ``vocab.json`` + ``merges.txt``.
    """
    if ENCODERS[family][0] is None:
        if tokenizer is not None:
            raise ConfigError(f"a {family} model has no first tokenizer; its tokenizer_2 comes from the model (drop tokenizer=)")
        return None
    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer
    if tokenizer in ("sd1", "sd2", "sdxl"):
        return load_tokenizer(str(tokenizer))
    folder = Path(tokenizer) if tokenizer is not None else model_folder
    if folder is None or (tokenizer is None and not is_tokenizer_folder(folder)):
        return load_tokenizer(family)
    return load_tokenizer(folder)


def resolve_tokenizer_2(family: Family, model_folder: Path | None = None) -> CLIPTokenizer | None:
    """SDXL's second tokenizer: the model folder's ``tokenizer_2/``, else the shipped CLIP tokenizer padding with
    "!" (as the released ``tokenizer_2/``); None for a family without a second text encoder."""
    if ENCODERS[family][1] is None:
        return None
    if model_folder is not None and is_tokenizer_folder(model_folder):
        return load_tokenizer_2(model_folder)
    return load_tokenizer_2(family)
