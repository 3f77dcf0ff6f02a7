"""Fine-tuning and training from scratch: data, the explicit loop, checkpoints. Core API:

    from ldm.training import DataConfig, TrainConfig, ImageCaptionDataset, scan_folder, train

    data = DataConfig(resolution=512, random_flip=True, caption_dropout=0.1)
    dataset = ImageCaptionDataset(scan_folder("my_images/", data), data, seed=0)
    config = TrainConfig(max_steps=2000, learning_rate=1e-5, ema_decay=0.9999, checkpointing_steps=500, seed=0)
    result = train(models, dataset, config, "runs/a", resume=None)   # resume="latest" continues a run

``models`` is anything with ``unet, vae, text_encoder, tokenizer, scheduler_config`` (e.g.
``ldm.loading.load_components(path)``, or freshly built ``UNet(cfg)`` / ``AutoencoderKL(cfg)`` /
``CLIPTextModel`` for training from scratch; an SDXL model set adds ``text_encoder_2, tokenizer_2``,
both frozen). ``train`` freezes the VAE always and the text encoder
unless ``config.train_text_encoder``; with ``config.lora_rank`` it trains peft LoRA adapters on the
attention projections only. Checkpoints are written every 500 steps and at the last one by default;
Ctrl-C saves one and raises ``TrainingInterrupted``. It returns ``TrainResult(unet, text_encoder,
step, last_loss, is_main_process, checkpoint)``; saving is the caller's job (``ldm.loading.save_diffusers``,
``ldm.adapters.training.save_lora``; ``results.save_result`` keeps it in the run's last checkpoint as ``ldm finetune`` does).
Run it under ``accelerate launch`` for several GPUs or machines (DDP, or FSDP2 sharding); nothing
else changes.

Modules: ``config`` (typed settings), ``data`` (folder scanning, captions, buckets, augmentations, SDXL's
micro-conditioning), ``captions`` (what captions condition the U-Net with: SD's and SDXL's),
``objective`` (noise, target, Min-SNR weighting, noise offset), ``ema``, ``checkpoint`` (atomic
training state, resume), ``results`` (a run's result kept in its last checkpoint; continuation),
``interrupt`` (Ctrl-C acted on between steps), ``distributed`` (whole tensors from sharded ones and
back; which back-ends are refused), ``reporting`` (metrics log, sample images), ``loop`` (``train``).
"""

from importlib import import_module

# Where each public name lives. Imported on first use: the loop pulls in accelerate and peft
# (seconds of start-up), which `ldm --help` or `ldm txt2img` should not pay for.
_PUBLIC = {
    "DataConfig": "config",
    "TrainConfig": "config",
    "DataWarning": "data",
    "Example": "data",
    "ImageCaptionDataset": "data",
    "scan_folder": "data",
    "ModelSet": "loop",
    "TrainResult": "loop",
    "make_accelerator": "loop",
    "train": "loop",
    "TrainingInterrupted": "interrupt",
    "SampleRequest": "reporting",
    "save_samples": "reporting",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f"ldm.training.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'ldm.training' has no attribute {name!r}")
