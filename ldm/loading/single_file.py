"""The original single-file layout (CompVis / Stability ``.ckpt`` and ``.safetensors``).

One file, three prefixes: ``model.diffusion_model.`` (U-Net), ``first_stage_model.``
(VAE), ``cond_stage_model.`` (text encoder). What is read and written besides the
network weights:

- read and ignored: ``model_ema.*`` (EMA copies; the plain weights are loaded, as
  diffusers does by default), ``first_stage_model.loss.*`` (VAE training loss),
  every top-level key outside the three prefixes (the DDPM schedule buffers
  ``betas``, ``alphas_cumprod``... are recomputed from the scheduler config);
- SD 1.x ``...embeddings.position_ids`` (0..76): written, checked and ignored on read;
- SD 2.x: the OpenCLIP tower's last block, ``text_projection`` and ``logit_scale`` are
  never run (SD conditions on the penultimate block). They are checked for shape and
  dropped on read, as the diffusers layout drops them. On write, the last block is
  written as zeros (an identity residual block), ``text_projection`` as the identity and
  ``logit_scale`` as log(100), so the file keeps the released layout and loads in the
  original code; their original values cannot survive a trip through a diffusers folder.
- the prediction type: ``v_pred`` key for v-prediction (ComfyUI's marker) and, in
  safetensors, ``modelspec.prediction_type`` metadata.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from ldm.errors import CheckpointError
from ldm.io import atomic_write
from ldm.loading import keymap
from ldm.loading.components import Components, build_networks, finish, load_entries, resolve_tokenizer, shapes_of
from ldm.loading.detect import PredictionType, detect
from ldm.loading.sources import TensorFile
from ldm.schedulers import SchedulerConfig

SUFFIXES = (".safetensors", ".ckpt")
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
COMPONENT_PREFIXES = (keymap.UNET_PREFIX, keymap.VAE_PREFIX, "cond_stage_model.")
V_PRED_KEY = "v_pred"
_MODELSPEC = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}


def normalized_names(keys) -> dict[str, str]:
    """normalized key -> key in the file; early SD 1.x files omit ``text_model.``."""
    names = {}
    for key in keys:
        name = key
        if key.startswith(keymap.SD1_TEXT_LEGACY_PREFIX) and not key.startswith(keymap.SD1_TEXT_PREFIX):
            name = keymap.SD1_TEXT_PREFIX + key[len(keymap.SD1_TEXT_LEGACY_PREFIX) :]
        names[name] = key
    return names


def _text_extras(family: str, text_shapes: dict[str, tuple[int, ...]], layers: int, blocks: int):
    """Keys of the file's text encoder that the network does not use, with their shapes."""
    if family == "sd1":
        positions = text_shapes["embeddings.position_embedding.weight"][0]
        return {keymap.SD1_TEXT_PREFIX + "embeddings.position_ids": (1, positions)}
    extras: dict[str, tuple[int, ...] | None] = {
        keymap.SD2_TEXT_PREFIX + "text_projection": None,  # (width, projection_dim); any projection width
        keymap.SD2_TEXT_PREFIX + "logit_scale": (),
    }
    for entry in keymap.text_entries(text_shapes, "sd2"):
        m = re.fullmatch(r"(.*transformer\.resblocks\.)0\.(.+)", entry.original)
        if m:
            for unused in range(layers, blocks):
                extras[f"{m[1]}{unused}.{m[2]}"] = entry.original_shape
    return extras


def load_single_file(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    prediction_type: PredictionType | None,
    tokenizer: str | Path | CLIPTokenizer | None,
) -> Components:
    source = TensorFile(path)
    names = normalized_names(source.shapes)
    shapes = {name: source.shapes[key] for name, key in names.items()}

    def read(name: str) -> torch.Tensor:
        return source.read(names[name])

    found = detect(shapes, source.metadata, source.global_step, read, prediction_type)
    unet, vae, text_encoder = build_networks(found.unet, found.vae, found.text)
    text_shapes = shapes_of(text_encoder)
    parts = (
        (unet, keymap.unet_entries(shapes_of(unet)), keymap.UNET_PREFIX, {}, "U-Net"),
        (vae, keymap.vae_entries(shapes_of(vae)), keymap.VAE_PREFIX, {}, "VAE"),
        (
            text_encoder,
            keymap.text_entries(text_shapes, found.family),
            "cond_stage_model.",
            _text_extras(found.family, text_shapes, found.text.num_hidden_layers, found.text_blocks_in_file),
            "text encoder",
        ),
    )
    for model, entries, prefix, optional, what in parts:
        own = {k: s for k, s in shapes.items() if k.startswith(prefix) and not k.startswith(IGNORED_PREFIXES)}
        load_entries(
            model, entries, own, read, device=device, dtype=dtype, where=f"{path} ({what})", optional=optional
        )
    finish(unet, vae, text_encoder, device)
    loaded_tokenizer = resolve_tokenizer(tokenizer, found.family)
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=loaded_tokenizer,
        scheduler_config=SchedulerConfig(prediction_type=found.prediction_type),
        family=found.family,
        source=path,
    )


def single_file_state(components: Components, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The original-layout state dict of ``components`` (tensors share memory with the models
    where the layout allows)."""
    state: dict[str, torch.Tensor] = {}
    for model, entries_of in (
        (components.unet, keymap.unet_entries),
        (components.vae, keymap.vae_entries),
        (components.text_encoder, lambda shapes: keymap.text_entries(shapes, components.family)),
    ):
        tensors = {key: value.detach() for key, value in model.state_dict().items()}
        for entry in entries_of(shapes_of(model)):
            state[entry.original] = keymap.to_original(entry, tensors)
    text = components.text_encoder.config
    if components.family == "sd1":
        positions = torch.arange(text.max_position_embeddings, dtype=torch.int64).unsqueeze(0)
        state[keymap.SD1_TEXT_PREFIX + "embeddings.position_ids"] = positions
    else:
        _add_unused_openclip_tensors(state, text.num_hidden_layers, text.hidden_size)
    if components.scheduler_config.prediction_type == "v_prediction":
        state[V_PRED_KEY] = torch.zeros(0)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def _add_unused_openclip_tensors(state: dict[str, torch.Tensor], layers: int, width: int) -> None:
    prefix = keymap.SD2_TEXT_PREFIX
    last = f"{prefix}transformer.resblocks.{layers - 1}."
    for key in [k for k in state if k.startswith(last)]:
        state[f"{prefix}transformer.resblocks.{layers}.{key[len(last):]}"] = torch.zeros_like(state[key])
    like = state[prefix + "ln_final.weight"]
    state[prefix + "text_projection"] = torch.eye(width, dtype=like.dtype, device=like.device)
    state[prefix + "logit_scale"] = torch.tensor(math.log(100.0), dtype=like.dtype, device=like.device)


def save_single_file(components: Components, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``components`` as one original-layout ``.safetensors`` or ``.ckpt``, atomically."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise CheckpointError(f"{path}: a single-file checkpoint must end in .safetensors or .ckpt")
    if path.exists():
        raise CheckpointError(f"{path} already exists; ldm never overwrites, choose a new name")
    state = {key: value.cpu().contiguous() for key, value in single_file_state(components, dtype).items()}
    prediction = components.scheduler_config.prediction_type

    def write(tmp: Path) -> None:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt", "modelspec.prediction_type": _MODELSPEC[prediction]})
        else:
            torch.save({"state_dict": state}, tmp)

    try:
        return atomic_write(path, write)
    except FileExistsError:
        raise CheckpointError(f"{path} already exists; ldm never overwrites, choose a new name") from None
