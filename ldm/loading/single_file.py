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
V_PRED_KEY = "v_pred"
_MODELSPEC = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}


def load_single_file(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    prediction_type: PredictionType | None,
    tokenizer: str | Path | CLIPTokenizer | None,
) -> Components:
    source = TensorFile(path)
    names = {keymap.normalize_single_file_key(key): key for key in source.shapes}
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
            keymap.unused_text_keys(found.family, text_shapes, found.text_blocks_in_file),
            "text encoder",
        ),
    )
    for model, entries, prefix, optional, what in parts:
        own = {k: s for k, s in shapes.items() if k.startswith(prefix) and not k.startswith(IGNORED_PREFIXES)}
        part_source = source.own_mapping()
        load_entries(
            model,
            entries,
            own,
            lambda name, part_source=part_source: part_source.read(names[name]),
            device=device,
            dtype=dtype,
            where=f"{path} ({what})",
            optional=optional,
        )
    finish(unet, vae, text_encoder, device)
    loaded_tokenizer = resolve_tokenizer(tokenizer, found.family)
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=loaded_tokenizer,
        scheduler_config=SchedulerConfig.sd_release(found.prediction_type),
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
    state.update(
        keymap.unused_text_tensors(
            components.family, state, text.num_hidden_layers, text.hidden_size, text.max_position_embeddings
        )
    )
    if components.scheduler_config.prediction_type == "v_prediction":
        state[V_PRED_KEY] = torch.zeros(0)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


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
