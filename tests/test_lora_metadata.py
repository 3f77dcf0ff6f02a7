"""kohya's metadata in the LoRA files `ldm finetune` writes, and the hashes as kohya and A1111 compute them."""

from __future__ import annotations

import hashlib
import json

import torch
from PIL import Image
from safetensors import safe_open
from test_training_support import one_torch_thread, save_micro_model  # noqa: F401 - one_torch_thread is an autouse fixture

from ldm.cli import main
from ldm.loading.hashes import kohya_hashes, legacy_hash, tensors_sha256
from ldm.loading.writers import write_safetensors
from ldm.training.lora_metadata import tag_frequency

CAPTIONS = ["a red square, Simple", "a red square, shiny ,  ", "blue circle"]


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def _after_header(path) -> bytes:
    data = path.read_bytes()
    return data[8 + int.from_bytes(data[:8], "little") :]


def test_finetune_lora_carries_kohyas_training_metadata_and_hashes(tmp_path, capsys):
    model = save_micro_model(tmp_path / "model")
    data = tmp_path / "shapes"
    data.mkdir()
    for number, caption in enumerate(CAPTIONS):
        Image.new("RGB", (32, 32), (200, 20 * number, 20)).save(data / f"{number}.png")
        (data / f"{number}.txt").write_text(caption)
    out = tmp_path / "styled"
    code = main([
        "finetune", "--model", str(model), "--data", str(data), "--output", str(out), "--resolution", "32", "--no-progress",
        "--max-steps", "2", "--lora-rank", "2", "--lora-alpha", "4", "--learning-rate", "1e-3", "--seed", "3",
        "--random-flip", "--train-text-encoder",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    lora = out / "lora.safetensors"
    meta = _metadata(lora)
    assert all(isinstance(value, str) for value in meta.values())
    expected = {
        "ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "4.0",
        "ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_resolution": "(32, 32)", "ss_learning_rate": "0.001",
        "ss_text_encoder_lr": "0.001", "ss_max_train_steps": "2", "ss_steps": "2", "ss_seed": "3", "ss_flip_aug": "True",
        "ss_num_train_images": "3", "ss_output_name": "styled", "ss_sd_model_name": "model",
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.prediction_type": "epsilon",
        "modelspec.resolution": "32x32", "modelspec.title": "styled",
    }  # fmt: skip
    assert {key: meta.get(key) for key in expected} == expected
    # kohya's shape: {image folder: {tag: images}}, tags split at commas, stripped, lower-cased.
    assert json.loads(meta["ss_tag_frequency"]) == {"shapes": {"a red square": 2, "simple": 1, "shiny": 1, "blue circle": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"shapes": {"n_repeats": 1, "img_count": 3}}
    # sshs_model_hash: SHA-256 of the bytes after the header (A1111 reads it as the file's LoRA hash).
    assert meta["sshs_model_hash"] == hashlib.sha256(_after_header(lora)).hexdigest() == tensors_sha256(lora)
    assert len(meta["sshs_legacy_hash"]) == 8
    # The file is its run's result, and the checkpoint's copy is the same file.
    assert (out / "checkpoints" / "checkpoint-000002" / "lora.safetensors").samefile(lora)


def test_kohya_hashes_against_hashlib_on_the_written_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    # More than 1 MiB + 64 KiB of data, so the legacy window is real bytes, not an empty read.
    tensors = {f"lora_unet_m{i}.lora_down.weight": torch.randn(64, 1024, generator=generator) for i in range(6)}
    tensors["lora_unet_m0.alpha"] = torch.tensor(4.0)
    metadata = {"ss_network_dim": "64", "ss_output_name": "x", "modelspec.title": "not hashed by the legacy hash"}
    model_hash, old_hash = kohya_hashes(tensors, metadata)
    full = tmp_path / "full.safetensors"
    write_safetensors(full, tensors, {**metadata, "sshs_model_hash": model_hash})
    assert model_hash == hashlib.sha256(_after_header(full)).hexdigest()
    # The legacy hash is A1111's old hash of the file holding only the ss_* metadata (kohya's rule).
    training_only = tmp_path / "training-only.safetensors"
    write_safetensors(training_only, tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    window = training_only.read_bytes()[0x100000 : 0x100000 + 0x10000]
    assert len(window) == 0x10000
    assert old_hash == hashlib.sha256(window).hexdigest()[:8] == legacy_hash(training_only)


def test_tag_frequency_counts_each_image_once_per_tag():
    assert tag_frequency("d", ["A, b", "a,,B, c", ""]) == {"d": {"a": 2, "b": 2, "c": 1}}
