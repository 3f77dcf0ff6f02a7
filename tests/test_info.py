"""`ldm info`: what a checkpoint, diffusers folder, LoRA, LoHa, VAE or embedding is, from headers; unknown files exit 2."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from ldm.cli import main
from ldm.loading import DEFAULT_MODEL_DIR

MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def info(capsys, *args) -> dict:
    assert main(["info", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "shapes.safetensors"
    assert main(["convert", str(DEFAULT_MODEL_DIR), str(path), "--dtype", "fp16"]) == 0
    return path


def test_single_file_checkpoint(single_file, capsys):
    capsys.readouterr()
    found = info(capsys, single_file)
    digest = hashlib.sha256(single_file.read_bytes()).hexdigest()
    assert found["what"] == "checkpoint" and found["layout"] == "original single file"
    assert found["family"] == "SD 1.x" and found["prediction_type"] == "epsilon (ldm.scheduler_config metadata)"  # ldm-shapes' own scheduler
    assert set(found["dtypes"]) <= {"F16", "I64"} and found["dtypes"]["F16"] > 0
    assert found["parameters"]["unet"] == 4_192_900 and found["parameters"]["text_encoder"] >= 3_317_120
    assert found["hashes"]["sha256"] == digest and found["hashes"]["autov2"] == digest[:10]
    data = single_file.read_bytes()
    assert found["hashes"]["autov3"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]
    assert found["hashes"]["legacy"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    # The text form: one "name: value" line each, nested values indented.
    assert main(["info", str(single_file), "--no-hash"]) == 0
    text = capsys.readouterr().out
    assert "family: SD 1.x" in text and "  unet: 4,192,900 (4.2 M)" in text and "sha256" not in text


def test_diffusers_folder(capsys):
    found = info(capsys, DEFAULT_MODEL_DIR)
    assert found["layout"] == "diffusers folder" and found["family"] == "SD 1.x"
    assert found["prediction_type"] == "epsilon (scheduler config)"
    assert found["parameters"] == {"unet": 4_192_900, "vae": 978_103, "text_encoder": 3_317_120}


def test_kohya_lora_with_training_metadata(tmp_path, capsys):
    path = tmp_path / "style.safetensors"
    tensors = {
        f"{MODULE}.lora_down.weight": torch.randn(4, 32), f"{MODULE}.lora_up.weight": torch.randn(32, 4),
        f"{MODULE}.alpha": torch.tensor(2.0),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 32),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 4),
    }  # fmt: skip
    save_file(tensors, str(path), {"ss_network_dim": "4", "ss_output_name": "style", "other": "not shown"})
    found = info(capsys, path)
    assert found["what"] == "adapter" and found["layout"] == "kohya/LyCORIS"
    assert found["kinds"] == {"LoRA": 2} and found["networks"] == {"text_encoder": 1, "unet": 1}
    assert found["ranks"] == [4] and found["alphas"] == [2.0]
    assert found["metadata"] == {"ss_network_dim": "4", "ss_output_name": "style"}
    data = path.read_bytes()
    assert found["hashes"]["autov3"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]


def test_loha_and_dora(tmp_path, capsys):
    path = tmp_path / "loha.safetensors"
    loha = {f"{MODULE}.{name}": torch.randn(shape) for name, shape in
            (("hada_w1_a", (32, 8)), ("hada_w1_b", (8, 32)), ("hada_w2_a", (32, 8)), ("hada_w2_b", (8, 32)))}
    other = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    dora = {f"{other}.lora_down.weight": torch.randn(2, 32), f"{other}.lora_up.weight": torch.randn(32, 2),
            f"{other}.dora_scale": torch.randn(1, 32)}  # fmt: skip
    save_file({**loha, **dora}, str(path))
    found = info(capsys, path)
    assert found["kinds"] == {"DoRA (LoRA)": 1, "LoHa": 1} and found["ranks"] == [2, 8]
    assert found["alphas"] == "none (alpha = rank)"


def test_vae_and_embedding(tmp_path, capsys):
    found = info(capsys, DEFAULT_MODEL_DIR / "vae")
    assert found == {"path": str(DEFAULT_MODEL_DIR / "vae"), "what": "VAE", "kind": "KL-VAE", "layout": "diffusers folder", "latent_channels": 4}
    embedding = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.randn(3, 768)}, str(embedding))
    found = info(capsys, embedding)
    assert (found["what"], found["vectors"], found["width"], found["family"]) == ("embedding", 3, 768, "SD 1.x")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: save_file({"encoder.weight": torch.zeros(2)}, str(p)), "none of what ldm reads (1 tensors, e.g. 'encoder.weight')"),
        (lambda p: p.write_bytes(b"not a model"), "not a readable safetensors file"),
        (lambda p: save_file({f"{MODULE}.oft_blocks": torch.zeros(2)}, str(p)), "is a OFT weight ('oft_blocks')"),
    ],
)
def test_unknown_files_exit_2_with_one_line(make, message, tmp_path, capsys):
    path = tmp_path / "thing.safetensors"
    make(path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ldm info: error:") and message in err, err
