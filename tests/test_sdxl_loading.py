"""SDXL models load and convert: diffusers folders, original (Stability / A1111) single files written by
ldm from a random diffusers SDXL pipeline and read back by ldm and by diffusers' own importer, base and
refiner told apart by their keys, ``ldm convert`` round trips bit-exact, and the pipeline's refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_sdxl
import torch
from safetensors import safe_open

from ldm.cli import main
from ldm.errors import CheckpointError
from ldm.loading import keymap, load_components, model_family, save_single_file
from ldm.loading.single_file import single_file_state

KINDS = ("base", "refiner")
FAMILIES = {"base": "sdxl", "refiner": "sdxl-refiner"}
NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Per kind: the diffusers folder, the diffusers pipeline read from it, and ldm's single file of it."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("sdxl")
    found = {}
    for kind, cls in zip(KINDS, (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline)):
        folder = tiny_sdxl.save_folder(root / kind, kind)
        single = save_single_file(load_components(folder), root / f"{kind}.safetensors")
        found[kind] = {"folder": folder, "reference": cls.from_pretrained(folder, local_files_only=True), "single": single}
    return found


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers folder by component/key; text keys without "text_model." (transformers 5
    saves CLIPTextModel without it, ldm writes it as the released folders have it)."""
    found = {}
    for weights in sorted(folder.glob("*/*.safetensors")):
        found.update({f"{weights.parent.name}/{k.removeprefix('text_model.')}": v for k, v in _tensors(weights).items()})
    return found


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _same_networks(ours, reference) -> None:
    for name in NETWORKS:
        mine, theirs = getattr(ours, name), getattr(reference, name)
        assert (mine is None) == (theirs is None), name
        if mine is not None:
            _same(mine.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["folder", "single"])
def test_loads_to_the_reference_weights(models, kind, layout):
    model = models[kind]
    ours = load_components(model[layout])
    assert ours.family == FAMILIES[kind]
    _same_networks(ours, model["reference"])
    reference = model["reference"]
    assert ours.unet.config == load_components(model["folder"]).unet.config
    assert (ours.vae.config.scaling_factor, ours.vae.config.force_upcast) == (0.13025, True)
    assert ours.text_encoder_2.config.projection_dim == reference.text_encoder_2.config.projection_dim
    assert ours.tokenizer_2.pad_token == reference.tokenizer_2.pad_token == "!"
    if kind == "base":
        assert ours.tokenizer.pad_token == reference.tokenizer.pad_token == "<|endoftext|>"
        assert ours.text_encoders == (ours.text_encoder, ours.text_encoder_2)
    else:
        assert ours.tokenizer is None and ours.text_encoders == (ours.text_encoder_2,)
    assert ours.scheduler_config.timestep_spacing == "leading"


def test_only_sdxl_models_upcast_their_vae(models, tmp_path):
    """diffusers writes force_upcast (its default, true) into every AutoencoderKL config, but only its SDXL
    pipelines read it: an SD model's VAE keeps decoding in the pipeline's dtype."""
    from tiny_models import save_diffusers_folder

    folder = save_diffusers_folder(tmp_path / "sd1")
    assert json.loads((folder / "vae" / "config.json").read_text())["force_upcast"] is True
    assert load_components(folder).vae.config.force_upcast is False
    assert load_components(models["refiner"]["folder"]).vae.config.force_upcast is True


@pytest.mark.parametrize("kind", KINDS)
def test_single_file_has_the_original_layout_and_is_read_by_its_keys_alone(models, kind):
    """Stability's names (conditioner.embedders.N, label_emb, fused in_proj, OpenCLIP's text_projection
    as x @ P), and no configuration metadata: the tiny model keeps SDXL's conventions, so detection from
    the keys and shapes gives its networks back."""
    model = models[kind]
    state = _tensors(model["single"])
    reference = model["reference"]
    bigg = keymap.SDXL_BIGG_PREFIX if kind == "base" else keymap.SDXL_REFINER_BIGG_PREFIX
    projection = reference.text_encoder_2.text_projection.weight
    assert torch.equal(state[bigg + "text_projection"], projection.t())
    q = reference.text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(state[bigg + "transformer.resblocks.0.attn.in_proj_weight"][: q.shape[0]], q)
    assert torch.equal(state[keymap.UNET_PREFIX + "label_emb.0.0.weight"], reference.unet.add_embedding.linear_1.weight)
    embedders = {".".join(key.split(".")[:4]) for key in state if key.startswith("conditioner.")}
    expected = {"base": {"conditioner.embedders.0.transformer", "conditioner.embedders.1.model"},
                "refiner": {"conditioner.embedders.0.model"}}[kind]  # fmt: skip
    assert embedders == expected
    with safe_open(str(model["single"]), "pt") as f:
        assert not {key for key in f.metadata() if key.startswith("ldm.")} - {"ldm.scheduler_config"}
    assert model_family(model["single"]) == model_family(model["folder"]) == FAMILIES[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_reads_our_single_file_to_the_same_weights(models, kind, monkeypatch):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cls = StableDiffusionXLPipeline if kind == "base" else StableDiffusionXLImg2ImgPipeline
    model = models[kind]
    pipe = cls.from_single_file(str(model["single"]), config=str(model["folder"]), local_files_only=True)
    _same_networks(pipe, model["reference"])


@pytest.mark.parametrize("kind", KINDS)
def test_convert_round_trips_are_bit_exact(models, kind, tmp_path, capsys):
    """single file -> folder -> single file gives the same tensors (and the same bytes); folder -> single
    file -> folder gives the folder's tensors back; diffusers reads the folder ldm writes."""
    from diffusers import DiffusionPipeline

    model = models[kind]
    folder, again = tmp_path / "folder", tmp_path / "again.safetensors"
    assert main(["convert", str(model["single"]), str(folder)]) == 0
    assert main(["convert", str(folder), str(again)]) == 0
    assert f"{FAMILIES[kind]} (epsilon)" in capsys.readouterr().out
    _same(_tensors(model["single"]), _tensors(again))
    assert again.read_bytes() == model["single"].read_bytes()
    _same(_folder_tensors(model["folder"]), _folder_tensors(folder))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == type(model["reference"]).__name__
    _same_networks(DiffusionPipeline.from_pretrained(folder, local_files_only=True), model["reference"])


def test_full_size_key_set_matches_diffusers_conversion_and_detection():
    """SDXL base at full size (on the meta device): ldm's single-file keys are the released file's
    (2,515 tensors), diffusers' converters map them onto diffusers' models of the released configs, and
    ldm's detection gives back the presets."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as reference
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ldm.loading.detect import detect
    from ldm.models import AutoencoderKL, UNet, UNetConfig, VAEConfig
    from ldm.models.text_encoder import clip_config, clip_config_2
    from ldm.schedulers import SchedulerConfig

    with torch.device("meta"):
        unet, vae = UNet(UNetConfig.sdxl()), AutoencoderKL(VAEConfig.sdxl())
        text, text_2 = CLIPTextModel(clip_config("sdxl")), CLIPTextModelWithProjection(clip_config_2("sdxl"))
        parts = SimpleNamespace(unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2, family="sdxl",
                                scheduler_config=SchedulerConfig())  # fmt: skip
        state = single_file_state(parts)
        diffusers_unet = UNet2DConditionModel.from_config(UNetConfig.sdxl().to_diffusers())
    assert len(state) == 2515
    assert state["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    converted = reference.convert_ldm_unet_checkpoint(state, dict(diffusers_unet.config))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in diffusers_unet.state_dict().items()}
    converted = reference.convert_open_clip_checkpoint(text_2, state, prefix=keymap.SDXL_BIGG_PREFIX)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in text_2.state_dict().items()}

    def no_read(key):
        raise AssertionError(f"detection read {key}")

    found = detect({k: tuple(v.shape) for k, v in state.items()}, {}, None, no_read)
    assert (found.family, UNetConfig.from_diffusers(found.unet), VAEConfig.from_diffusers(found.vae)) == (
        "sdxl", UNetConfig.sdxl(), VAEConfig.sdxl()
    )
    assert found.text.to_dict() == clip_config("sdxl").to_dict()
    assert found.text_2.to_dict() == clip_config_2("sdxl").to_dict()


def test_a_file_with_other_sdxl_text_encoders_is_refused(models, tmp_path):
    from safetensors.torch import save_file

    state = _tensors(models["base"]["single"])
    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith(keymap.SDXL_BIGG_PREFIX)}, str(broken))
    with pytest.raises(CheckpointError, match="unknown SDXL text encoders .*conditioner.embedders.0.transformer"):
        load_components(broken)
    extra = tmp_path / "extra.safetensors"
    save_file({**state, "conditioner.embedders.1.model.visual.proj": torch.zeros(2)}, str(extra))
    with pytest.raises(CheckpointError, match="1 unexpected key.*visual.proj"):
        load_components(extra)


@pytest.mark.parametrize("kind", KINDS)
def test_info_describes_sdxl_files_and_folders(models, kind):
    from ldm.loading.info import describe

    name = {"base": "SDXL", "refiner": "SDXL refiner"}[kind]
    single = describe(models[kind]["single"], hashes=False)
    assert single["family"] == name and single["prediction_type"].startswith("epsilon (")
    reference = models[kind]["reference"]
    counts = {part: sum(p.numel() for p in getattr(reference, part).parameters()) for part in NETWORKS if getattr(reference, part) is not None}
    counts["text_encoder_2"] += 1  # the file's logit_scale, which no network runs
    if kind == "base":
        counts["text_encoder"] += 77  # the file's position_ids buffer
    assert single["parameters"] == counts
    folder = describe(models[kind]["folder"])
    assert folder["family"] == name and set(folder["parameters"]) == set(counts)
    built = {"base": "merges and fine-tunes (U-Net or LoRA)", "refiner": "converts and merges; finetune not built"}[kind]
    assert built in single["ldm"] and ("generates" in single["ldm"])


def test_fused_attention_weights_load_in_place_each_with_a_storage_of_its_own(models, tmp_path):
    """bigG's fused in_proj splits into q, k and v without a copy: each is read in place from the file's mapping
    (so its pages go back to the page cache after use, and no copy costs load time or memory), through a storage
    of its own, so safetensors still saves the network (it refuses tensors that share a storage)."""
    from safetensors.torch import save_file

    from ldm.paging import PAGE, release_tensors

    encoder = load_components(models["base"]["single"]).text_encoder_2
    attention = encoder.text_model.encoder.layers[0].self_attn
    weights = [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 3
    expected = [w.detach().clone() for w in weights]
    size = sum(w.numel() * w.element_size() for w in weights)
    assert release_tensors(weights) >= size - 2 * PAGE  # file pages, not a copy in the process's own memory
    assert all(torch.equal(w, e) for w, e in zip(weights, expected))  # read back from the file
    reference = models["base"]["reference"].text_encoder_2.text_model.encoder.layers[0].self_attn
    assert torch.equal(attention.k_proj.weight, reference.k_proj.weight)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp_path / "text_encoder_2.safetensors"))


def test_a_non_contiguous_fused_projection_splits_into_copies():
    """A ``.ckpt`` may hold the fused in_proj transposed: its thirds are not contiguous, so each becomes a copy."""
    from ldm.loading.keymap import own_storage

    fused = torch.randn(192, 768).t()  # (768, 192), not contiguous
    parts = [own_storage(part) for part in fused.chunk(3, dim=0)]
    assert all(part.is_contiguous() and torch.equal(part, expected) for part, expected in zip(parts, fused.chunk(3, dim=0)))
    assert len({part.untyped_storage().data_ptr() for part in parts}) == 3
