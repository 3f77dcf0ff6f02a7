"""The original single-file layout (CompVis / Stability ``.ckpt`` and ``.safetensors``).

One file, three prefixes: ``model.diffusion_model.`` (U-Net), ``first_stage_model.``
(VAE), ``cond_stage_model.`` (text encoder); SDXL's text encoders are under
``conditioner.embedders.N.`` (``keymap.TEXT_SLOTS``). What is read and written besides the
network weights:

- read and ignored: ``model_ema.*`` (EMA copies; the plain weights are loaded, as
  diffusers does by default), ``first_stage_model.loss.*`` (VAE training loss),
  every top-level key outside the three prefixes (the DDPM schedule buffers
  ``betas``, ``alphas_cumprod``... are recomputed from the scheduler config);
- SD 1.x's and SDXL's CLIP ``...embeddings.position_ids`` (0..76): written, checked and ignored on read;
- SDXL's OpenCLIP bigG ``logit_scale``: written as log(100), checked for shape and ignored on
  read (SDXL never runs it; diffusers drops it too);
- SD 2.x: the OpenCLIP tower's last block, ``text_projection`` and ``logit_scale`` are
  never run (SD conditions on the penultimate block). They are checked for shape and
  dropped on read, as the diffusers layout drops them. On write, the last block is
  written as zeros (an identity residual block), ``text_projection`` as the identity and
  ``logit_scale`` as log(100), so the file keeps the released layout and loads in the
  original code; their original values cannot survive a trip through a diffusers folder.
- the prediction type: ``v_pred`` key for v-prediction (ComfyUI's marker) and, in
  safetensors, ``modelspec.prediction_type`` metadata;
- zero terminal SNR: a ``ztsnr`` key (ComfyUI's marker, beside ``v_pred`` in the v-prediction
  models trained that way) sets the scheduler's ``rescale_betas_zero_snr`` where its config leaves
  it unset; a v-prediction model only; written for such a model;
- EDM models (``edm_mean`` / ``edm_std``: Playground v2.5; ``edm_vpred.sigma_max``: CosXL) are
  refused by name: their noise schedule is not the DDPM one ldm's samplers take;
- the configuration, when SD's conventions would not give it back (a model of other
  widths, heads, groups, sizes or VAE scaling; a scheduler or generation defaults of its
  own): JSON strings in the metadata (``ldm.loading.configs``). Read back before the
  conventions; ``config=`` (a diffusers folder's configs) wins over both.

Files are written byte for byte reproducibly (``ldm.loading.writers``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from ldm.errors import CheckpointError, LdmError
from ldm.io import atomic_write
from ldm.loading import keymap
from ldm.loading.components import (
    Components,
    build_networks,
    build_text_encoder_2,
    finish,
    load_entries,
    resolve_tokenizer,
    resolve_tokenizer_2,
    shapes_of,
)
from ldm.loading.configs import (
    METADATA_KEYS,
    TEXT_2_FIELDS,
    ModelConfigs,
    check_text_to_image,
    folder_configs,
    from_metadata,
    networks_of,
    recommendations_from_metadata,
    text_fields,
    to_metadata,
)
from ldm.loading.detect import (
    EDM_KEYS,
    SDXL_FAMILIES,
    V_PRED_KEY,
    ZERO_SNR_KEY,
    PredictionType,
    detect,
    detect_family,
    detect_prediction_type,
    stored_text_blocks,
)
from ldm.loading.sources import TensorFile
from ldm.loading.writers import write_ckpt, write_safetensors
from ldm.models import UNetConfig, VAEConfig
from ldm.schedulers import SchedulerConfig

SUFFIXES = (".safetensors", ".ckpt")
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
_MODELSPEC = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}


def load_single_file(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    prediction_type: PredictionType | None,
    tokenizer: str | Path | CLIPTokenizer | None,
    config: Path | None = None,
) -> Components:
    source = TensorFile(path)
    names = {keymap.normalize_single_file_key(key): key for key in source.shapes}
    shapes = {name: source.shapes[key] for name, key in names.items()}

    def read(name: str) -> torch.Tensor:
        return source.read(names[name])

    if not keymap.is_whole_model(shapes) and keymap.vae_layout(shapes) is not None:
        raise CheckpointError(f"{path} holds only a VAE, not a whole model; pass a model, and this file as its VAE (--vae / vae=)")
    family = detect_family(shapes)
    _refuse_edm(shapes, path)
    configs, text_blocks = file_configs(source, shapes, read, family, config, prediction_type)
    check_text_to_image(configs.unet, configs.vae, path)
    unet, vae, text_encoder = build_networks(configs.unet, configs.vae, configs.text)
    text_encoder_2 = build_text_encoder_2(configs.text_2)
    parts = [
        (unet, keymap.unet_entries(shapes_of(unet)), keymap.UNET_PREFIX, {}, "U-Net"),
        (vae, keymap.vae_entries(shapes_of(vae)), keymap.VAE_PREFIX, {}, "VAE"),
    ]
    for slot, encoder in enumerate((text_encoder, text_encoder_2)):
        if encoder is not None:
            parts.append(_text_part(encoder, family, slot, shapes, text_blocks[slot]))
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
    _check_nothing_else(shapes, family, path)
    finish(unet, vae, text_encoder, device, text_encoder_2)
    folder = config / "tokenizer" if config is not None else None
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=resolve_tokenizer(tokenizer, family, folder),
        scheduler_config=configs.scheduler,
        family=family,
        source=path,
        generation_config=configs.generation,
        text_encoder_2=text_encoder_2,
        tokenizer_2=resolve_tokenizer_2(family, config / "tokenizer_2" if config is not None else None),
    )


def _text_part(encoder, family: str, slot: int, shapes: dict[str, tuple[int, ...]], blocks: int) -> tuple:
    """(network, key map, the file's prefix for it, tensors it may hold unused, name) of text encoder ``slot``."""
    place = keymap.text_slot(family, slot)
    # SD 1.x / 2.x files keep every text tensor under cond_stage_model. (the key map checks which are known).
    prefix = "cond_stage_model." if family not in SDXL_FAMILIES else place.prefix
    own_shapes = shapes_of(encoder)
    unused = keymap.unused_text_keys(family, own_shapes, blocks, slot)
    name = ("text encoder", "text encoder 2")[slot]
    return encoder, keymap.text_entries(own_shapes, family, slot), prefix, unused, name


def _check_nothing_else(shapes: dict[str, tuple[int, ...]], family: str, path: Path) -> None:
    """An SDXL file's conditioner holds its text encoders and nothing ldm would silently leave unread."""
    if family not in SDXL_FAMILIES:
        return
    places = [place.prefix for place in keymap.TEXT_SLOTS[family] if place is not None]
    stray = sorted(k for k in shapes if k.startswith(keymap.SDXL_CONDITIONER_PREFIX) and not k.startswith(tuple(places)))
    if stray:
        raise CheckpointError(f"{path} has conditioner tensors ldm does not know ({stray[0]}, ...); it is not an SDXL {family} file")


def _refuse_edm(shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """An EDM model (Karras et al. 2022: continuous sigmas, its own preconditioning) would sample as noise."""
    found = [key for key in EDM_KEYS if key in shapes]
    if found:
        kind = "CosXL-style v-prediction EDM" if found[0].startswith("edm_vpred") else "Playground v2.5-style EDM"
        raise CheckpointError(
            f"{path} is a {kind} model (key {found[0]!r}), whose noise schedule ldm's samplers do not take yet; "
            "use a DDPM-trained SD, SD 2.x or SDXL model"
        )


def file_configs(
    source: TensorFile,
    shapes: dict[str, tuple[int, ...]],
    read: Callable[[str], torch.Tensor],
    family: str,
    config: Path | None,
    prediction_type: PredictionType | None,
) -> tuple[ModelConfigs, tuple[int, int]]:
    """The configuration of a single file, its scheduler resolved, and how many blocks each text encoder stores.

    From ``config`` (a folder's files) if given, else from the file's metadata, else detected from
    shapes by SD's conventions. ``prediction_type`` overrides what any of them says.
    """
    blocks = tuple(
        stored_text_blocks(shapes, family, slot) if place is not None else 0
        for slot, place in enumerate(keymap.TEXT_SLOTS[family])
    )
    given = folder_configs(config) if config is not None else from_metadata(source.metadata, source.path, family)
    if given is None:
        found = detect(shapes, source.metadata, source.global_step, read, prediction_type)
        scheduler, generation = recommendations_from_metadata(source.metadata, source.path)
        if scheduler is not None and prediction_type is not None:
            scheduler = scheduler.with_values(prediction_type=prediction_type)
        detected = ModelConfigs(
            UNetConfig.from_diffusers(found.unet),
            VAEConfig.from_diffusers(found.vae),
            found.text,
            marked_zero_snr(scheduler or release_scheduler(family, found.prediction_type), shapes, source.path),
            generation,
            found.text_2,
        )
        return detected, blocks
    if given.family != family:
        raise CheckpointError(f"{source.path} holds an {family} model but its configuration describes an {given.family} one")
    scheduler = given.scheduler
    if scheduler is None:
        prediction = prediction_type or detect_prediction_type(family, shapes, source.metadata, source.global_step, read)
        scheduler = release_scheduler(family, prediction)
    elif prediction_type is not None:
        scheduler = scheduler.with_values(prediction_type=prediction_type)
    return replace(given, scheduler=marked_zero_snr(scheduler, shapes, source.path)), blocks


def marked_zero_snr(scheduler: SchedulerConfig, shapes: Mapping[str, tuple[int, ...]], path: Path) -> SchedulerConfig:
    """The ``ztsnr`` key (ComfyUI's marker): betas rescaled to zero terminal SNR (Lin et al. 2024, Alg. 1),
    where the scheduler config leaves that unset; a config that sets it wins."""
    if ZERO_SNR_KEY not in shapes or "rescale_betas_zero_snr" not in scheduler.defaulted:
        return scheduler
    if scheduler.prediction_type != "v_prediction":
        raise CheckpointError(
            f"{path} has the ztsnr key (zero terminal SNR) but predicts {scheduler.prediction_type}: zero terminal SNR "
            "needs a v-prediction model; pass prediction_type='v_prediction' (--prediction-type) if it is one"
        )
    return scheduler.with_values(rescale_betas_zero_snr=True)


def release_scheduler(family: str, prediction_type: PredictionType) -> SchedulerConfig:
    """The scheduler config a single file implies: SD's released keys; SDXL's also fix "leading" timesteps
    (stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json, as diffusers' ``from_single_file``)."""
    config = SchedulerConfig.sd_release(prediction_type)
    return config.with_values(timestep_spacing="leading") if family in SDXL_FAMILIES else config


def single_file_state(components: Components, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The original-layout state dict of ``components`` (tensors share memory with the models
    where the layout allows)."""
    state: dict[str, torch.Tensor] = {}
    family = components.family
    networks = [(components.unet, keymap.unet_entries), (components.vae, keymap.vae_entries)]
    for slot, encoder in enumerate((components.text_encoder, components.text_encoder_2)):
        if encoder is not None:
            networks.append((encoder, lambda shapes, slot=slot: keymap.text_entries(shapes, family, slot)))
    for model, entries_of in networks:
        tensors = {key: value.detach() for key, value in model.state_dict().items()}
        for entry in entries_of(shapes_of(model)):
            state[entry.original] = keymap.to_original(entry, tensors)
    for slot, encoder in enumerate((components.text_encoder, components.text_encoder_2)):
        if encoder is not None:
            text = encoder.config
            state.update(
                keymap.unused_text_tensors(
                    family, state, text.num_hidden_layers, text.hidden_size, text.max_position_embeddings, slot
                )
            )
    if components.scheduler_config.prediction_type == "v_prediction":
        state[V_PRED_KEY] = torch.zeros(0)
    if writes_zero_snr(components.scheduler_config):
        state[ZERO_SNR_KEY] = torch.zeros(0)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def writes_zero_snr(scheduler: SchedulerConfig) -> bool:
    """Whether a file gets the ``ztsnr`` key: zero-SNR betas on a v-prediction model, as ComfyUI reads the key."""
    return scheduler.rescale_betas_zero_snr and scheduler.prediction_type == "v_prediction"


def configs_of(components: Components) -> ModelConfigs:
    return ModelConfigs(
        components.unet.config,
        components.vae.config,
        components.text_encoder.config if components.text_encoder is not None else None,
        components.scheduler_config,
        components.generation_config,
        components.text_encoder_2.config if components.text_encoder_2 is not None else None,
    )


def conventions_give_back(configs: ModelConfigs, state: dict[str, torch.Tensor]) -> bool:
    """True if reading ``state`` by SD's conventions (``detect``) rebuilds exactly these networks."""
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    try:
        found = detect(shapes, {}, None, state.__getitem__, configs.scheduler.prediction_type)
        return (
            UNetConfig.from_diffusers(found.unet) == configs.unet
            and VAEConfig.from_diffusers(found.vae) == configs.vae
            and text_fields(found.text) == text_fields(configs.text)
            and text_fields(found.text_2, TEXT_2_FIELDS) == text_fields(configs.text_2, TEXT_2_FIELDS)
        )
    except LdmError:
        return False


def file_metadata(components: Components, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """The conventions' metadata, plus each configuration that the conventions would not give back."""
    configs = configs_of(components)
    prediction = configs.scheduler.prediction_type
    parts = () if conventions_give_back(configs, state) else networks_of(components.family)
    # The file states its prediction type (modelspec) and zero terminal SNR (the ztsnr key), so a config that
    # left them out is SD's too.
    conventions = release_scheduler(components.family, prediction)
    if writes_zero_snr(configs.scheduler):
        conventions = conventions.with_values(rescale_betas_zero_snr=True)
    if configs.scheduler.with_values(prediction_type=prediction) != conventions:
        parts += ("scheduler",)
    if configs.generation:
        parts += ("generation",)
    return {"format": "pt", "modelspec.prediction_type": _MODELSPEC[prediction], **to_metadata(configs, parts)}


def save_single_file(components: Components, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``components`` as one original-layout ``.safetensors`` or ``.ckpt``, atomically.

    A ``.ckpt`` keeps the configuration strings of the metadata in a ``"metadata"`` dict beside
    its ``"state_dict"`` (only when there are any: a standard model keeps the released layout).
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise CheckpointError(f"{path}: a single-file checkpoint must end in .safetensors or .ckpt")
    if path.exists():
        raise CheckpointError(f"{path} already exists; ldm never overwrites, choose a new name")
    state = {key: value.cpu().contiguous() for key, value in single_file_state(components, dtype).items()}
    metadata = file_metadata(components, state)

    def write(tmp: Path) -> None:
        if path.suffix == ".safetensors":
            write_safetensors(tmp, state, metadata)
        else:
            write_ckpt(tmp, state, {key: value for key, value in metadata.items() if key in METADATA_KEYS.values()})

    try:
        return atomic_write(path, write)
    except FileExistsError:
        raise CheckpointError(f"{path} already exists; ldm never overwrites, choose a new name") from None
