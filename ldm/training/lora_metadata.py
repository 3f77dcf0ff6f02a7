"""The training metadata of a LoRA file, as kohya's ``train_network.py`` writes it.

AUTOMATIC1111's LoRA cards, ComfyUI's metadata views and the model-sharing sites show a kohya file's
``ss_*`` keys (settings, base model, tag frequencies) and read ``modelspec.*`` (Stability's model spec)
for the architecture. Every value is a string, as safetensors metadata is: numbers and booleans as
Python's ``str`` writes them (``"0.0001"``, ``"True"``), JSON for the nested ones, as kohya does.

Left out on purpose: kohya's timestamps (``ss_training_started_at``...), ``ss_session_id`` (random)
and ``modelspec.date``, so that the same run writes the same file (``ldm finetune`` is reproducible
to the byte); and the settings that ldm has no counterpart for. The file hashes (``sshs_*``) are added
by ``ldm.adapters.training.save_lora``, which knows the bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ldm.loading.hashes import legacy_hash, sha256
from ldm.training.config import DataConfig, TrainConfig

# Stability's model-spec architecture ids (github.com/Stability-AI/ModelSpec), with kohya's "/lora" suffix.
ARCHITECTURES = {
    "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}  # fmt: skip
# modelspec.implementation as kohya writes it: SD 1.x / 2.x LoRAs in diffusers' module names, SDXL's in Stability's.
IMPLEMENTATIONS = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}
MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}


def tag_frequency(folder_name: str, captions: Iterable[str]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: ``{folder: {tag: images}}``, a caption's tags split at commas, stripped
    and lower-cased, each image's caption counted once (``BaseDataset.set_tag_frequency``)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {folder_name: counts}


def base_model_version(family: str, prediction_type: str) -> str:
    """kohya's ``ss_base_model_version``: ``sdxl_base_v1-0`` for SDXL, else ``get_model_version_str_for_sd1_sd2``'s
    ``sd_v1``, ``sd_v2``, with ``_v`` for v-prediction."""
    if family == "sdxl":
        return "sdxl_base_v1-0"
    return f"sd_{'v2' if family == 'sd2' else 'v1'}{'_v' if prediction_type == 'v_prediction' else ''}"


def lora_metadata(
    config: TrainConfig,
    data: DataConfig,
    captions: list[str],
    data_dir: Path,
    family: str,
    prediction_type: str,
    model: Path,
    name: str,
    steps: int,
) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` metadata of the LoRA a run of ``config`` on ``captions`` (one per image
    of ``data_dir``) trained for ``steps`` steps from ``model`` (``family``, ``prediction_type``); ``name``
    is the run's (the file's A1111 alias, ``ss_output_name``)."""
    folder = Path(data_dir).resolve().name
    v = prediction_type == "v_prediction"
    values: dict[str, object] = {
        "ss_output_name": name,
        "ss_sd_model_name": Path(model).name,
        "ss_base_model_version": base_model_version(family, prediction_type),
        "ss_resolution": (data.resolution, data.resolution),
        "ss_learning_rate": config.learning_rate,
        "ss_unet_lr": config.learning_rate,
        "ss_max_train_steps": config.max_steps,
        "ss_steps": steps,
        "ss_batch_size_per_device": config.batch_size,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_lr_scheduler": config.lr_schedule,
        "ss_lr_warmup_steps": config.lr_warmup_steps,
        "ss_optimizer": (
            f"torch.optim.adamw.AdamW(weight_decay={config.weight_decay},betas=({config.adam_beta1}, {config.adam_beta2}),"
            f"eps={config.adam_epsilon})"
        ),
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_mixed_precision": config.mixed_precision,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_seed": config.seed,
        "ss_noise_offset": config.noise_offset,
        "ss_min_snr_gamma": config.min_snr_gamma,
        "ss_caption_dropout_rate": data.caption_dropout,
        "ss_flip_aug": data.random_flip,
        "ss_random_crop": data.crop == "random",
        "ss_enable_bucket": data.buckets,
        "ss_cache_latents": data.cache_latents,
        "ss_num_train_images": len(captions),
        "ss_num_reg_images": 0,
        "ss_dataset_dirs": json.dumps({folder: {"n_repeats": 1, "img_count": len(captions)}}),
        "ss_tag_frequency": json.dumps(tag_frequency(folder, captions)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES["sd2-v" if family == "sd2" and v else family] + "/lora",
        "modelspec.implementation": IMPLEMENTATIONS[family],
        "modelspec.title": name,
        "modelspec.resolution": f"{data.resolution}x{data.resolution}",
        "modelspec.prediction_type": MODELSPEC_PREDICTION[prediction_type],
    }
    if family != "sdxl":  # kohya writes it for SD 1.x / 2.x only
        values["ss_v2"] = family == "sd2"
    if config.train_text_encoder:
        values["ss_text_encoder_lr"] = config.text_encoder_learning_rate or config.learning_rate
    if config.ema_decay is not None:
        values["ss_ema_decay"] = config.ema_decay  # not kohya's: says the file holds EMA weights
    if Path(model).is_file():  # kohya hashes the base model file (A1111's old hash and its SHA-256)
        values["ss_sd_model_hash"] = legacy_hash(Path(model))
        values["ss_new_sd_model_hash"] = sha256(Path(model))
    return {key: str(value) for key, value in values.items()}
