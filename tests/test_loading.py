"""Loading real-format SD 1.x / 2.x checkpoints: diffusers folders and original single files.

Reference: tiny random-weight diffusers / transformers models (tests/tiny_models.py), saved in
the diffusers layout; single files are written by ldm and checked independently against
diffusers' own single-file conversion (diffusers.loaders.single_file_utils), so the key map is
not only self-consistent.
"""

from __future__ import annotations

import gc
import json
import os
import socket

import pytest
import torch
from diffusers.loaders import single_file_utils as reference
from safetensors import safe_open
from tiny_models import clip_text_model, diffusers_unet, diffusers_vae, save_diffusers_folder

from ldm.errors import CheckpointError
from ldm.loading import keymap, load_components, save_single_file
from ldm.loading.single_file import single_file_state

FAMILIES = ("sd1", "sd2")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    return {family: save_diffusers_folder(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def single_files(folders, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("single")
    files = {}
    for family in FAMILIES:
        components = load_components(folders[family])
        for suffix in (".safetensors", ".ckpt"):
            files[family, suffix] = save_single_file(components, root / f"{family}{suffix}")
    return files


def _read_single(path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_keys_match_diffusers_own_conversion(family, single_files):
    """diffusers' converters map our single file back to exactly the reference state dicts."""
    checkpoint = _read_single(single_files[family, ".safetensors"])
    unet, vae, text = diffusers_unet(family), diffusers_vae(), clip_text_model(family)
    converted = {
        "unet": reference.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)),
        "vae": reference.convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)),
    }
    if family == "sd1":
        text_state = reference.convert_ldm_clip_checkpoint(checkpoint)
        text_state.pop("text_model.embeddings.position_ids")
    else:
        text_state = reference.convert_open_clip_checkpoint(text, checkpoint)
        # diffusers ignores the unused last block only at ViT-H size (resblocks.23); drop ours likewise.
        last = text.config.num_hidden_layers
        text_state = {k: v for k, v in text_state.items() if not k.startswith(f"text_model.encoder.layers.{last}.")}
    converted["text"] = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    for name, model in (("unet", unet), ("vae", vae), ("text", text)):
        expected = model.state_dict()
        assert converted[name].keys() == expected.keys(), name
        for key, value in expected.items():
            assert torch.equal(converted[name][key], value), f"{name} {key}"


@pytest.fixture(scope="module")
def reference_outputs() -> dict:
    """Inputs and the diffusers / transformers reference outputs, computed once per family."""
    outputs = {}
    for family in FAMILIES:
        g = torch.Generator().manual_seed(0)
        unet, vae, text = diffusers_unet(family), diffusers_vae(), clip_text_model(family)
        inputs = {
            "tokens": torch.randint(0, 49408, (1, 77), generator=g),
            "sample": torch.randn(2, 4, 8, 8, generator=g),
            "context": torch.randn(2, 8, unet.config.cross_attention_dim, generator=g),
            "t": torch.tensor([10, 900]),
            "image": torch.rand(1, 3, 32, 32, generator=g) * 2 - 1,
        }
        with torch.no_grad():
            posterior = vae.encode(inputs["image"]).latent_dist
            outputs[family] = inputs | {
                "text": text(inputs["tokens"]).last_hidden_state,
                "unet": unet(inputs["sample"], inputs["t"], inputs["context"]).sample,
                "mean": posterior.mean,
                "logvar": posterior.logvar,
                "decoded": vae.decode(posterior.mean).sample,
            }
    return outputs


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_outputs_match_diffusers(family, suffix, single_files, reference_outputs):
    loaded = load_components(single_files[family, suffix])
    ref = reference_outputs[family]
    assert loaded.family == family
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert loaded.tokenizer.pad_token == ("!" if family == "sd2" else "<|endoftext|>")
    with torch.no_grad():
        assert _rel(loaded.text_encoder(ref["tokens"]).last_hidden_state, ref["text"]) < 1e-5
        assert _rel(loaded.unet(ref["sample"], ref["t"], ref["context"]), ref["unet"]) < 1e-5
        posterior = loaded.vae.encode(ref["image"])
        assert _rel(posterior.mean, ref["mean"]) < 1e-5
        assert _rel(posterior.logvar, ref["logvar"]) < 1e-5
        assert _rel(loaded.vae.decode(ref["mean"]), ref["decoded"]) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_loads_bit_identical(family, folders):
    loaded = load_components(folders[family])
    assert loaded.family == family
    assert loaded.scheduler_config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    references = (diffusers_unet(family), diffusers_vae(), clip_text_model(family))
    for ours, ref in zip((loaded.unet, loaded.vae, loaded.text_encoder), references):
        expected = ref.state_dict()
        state = ours.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert loaded.text_encoder.embeddings.position_ids.tolist() == [list(range(77))]


def test_diffusers_folder_with_bin_and_fp16_variant_only(tmp_path):
    bin_folder = save_diffusers_folder(tmp_path / "bin", "sd1", safe_serialization=False)
    loaded = load_components(bin_folder)
    expected = diffusers_unet("sd1").state_dict()
    assert all(torch.equal(loaded.unet.state_dict()[k], expected[k]) for k in expected)

    fp16 = save_diffusers_folder(tmp_path / "fp16", "sd1")
    for weights in fp16.glob("*/diffusion_pytorch_model.safetensors"):
        with safe_open(str(weights), "pt") as f:
            half = {k: f.get_tensor(k).half() for k in f.keys()}
        from safetensors.torch import save_file

        save_file(half, str(weights.with_name("diffusion_pytorch_model.fp16.safetensors")), {"format": "pt"})
        weights.unlink()
    loaded = load_components(fp16, dtype=torch.float16)
    assert loaded.unet.conv_in.weight.dtype == torch.float16
    assert torch.equal(loaded.unet.conv_in.weight, expected["conv_in.weight"].half())


def test_sharded_diffusers_component(folders, tmp_path):
    import shutil

    folder = tmp_path / "sharded"
    shutil.copytree(folders["sd1"], folder)
    shutil.rmtree(folder / "unet")
    diffusers_unet("sd1").save_pretrained(folder / "unet", max_shard_size="300KB")
    assert len(list((folder / "unet").glob("*.safetensors"))) > 1
    loaded = load_components(folder)
    expected = diffusers_unet("sd1").state_dict()
    assert all(torch.equal(loaded.unet.state_dict()[k], expected[k]) for k in expected)


def test_dtype_and_prediction_type_arguments(single_files):
    loaded = load_components(single_files["sd1", ".safetensors"], dtype="bf16", prediction_type="v_prediction")
    assert loaded.unet.conv_in.weight.dtype == torch.bfloat16
    assert loaded.text_encoder.embeddings.token_embedding.weight.dtype == torch.bfloat16
    assert loaded.scheduler_config.prediction_type == "v_prediction"
    assert (loaded.scheduler_config.beta_schedule, loaded.scheduler_config.beta_start) == ("scaled_linear", 0.00085)
    assert (loaded.scheduler_config.timestep_spacing, loaded.scheduler_config.steps_offset) == ("leading", 1)


def test_legacy_sd1_text_keys_and_legacy_pickle_format(single_files, tmp_path):
    """Early SD 1.x files: text keys without "text_model.", pre-zip torch.save format (no mmap)."""
    state = _read_single(single_files["sd1", ".safetensors"])
    old_prefix, new_prefix = "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
    legacy = {k.replace(old_prefix, new_prefix): v for k, v in state.items()}
    assert legacy.keys() != state.keys()
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": legacy}, path, _use_new_zipfile_serialization=False)
    loaded = load_components(path)
    expected = clip_text_model("sd1").state_dict()
    assert all(torch.equal(loaded.text_encoder.state_dict()[k], expected[k]) for k in expected)


def _sd2_state_with(single_files, **top_level) -> dict:
    state = _read_single(single_files["sd2", ".safetensors"])
    state.pop("v_pred")
    return {"state_dict": state, **top_level}


@pytest.mark.parametrize(
    ("global_step", "bias_std", "expected"),
    [(875000, 0.0, "epsilon"), (110000, 0.0, "v_prediction"), (None, 0.0, "epsilon"), (None, 0.2, "v_prediction")],
)
def test_sd2_prediction_type_detection_rules(single_files, tmp_path, global_step, bias_std, expected):
    top = {} if global_step is None else {"global_step": global_step}
    content = _sd2_state_with(single_files, **top)
    key = "model.diffusion_model.output_blocks.8.1.transformer_blocks.0.norm1.bias"
    assert key in content["state_dict"]  # the last output block with attention of the tiny SD2 U-Net
    content["state_dict"][key] = torch.randn(content["state_dict"][key].shape) * bias_std * 1.5
    path = tmp_path / "sd2.ckpt"
    torch.save(content, path)
    assert load_components(path).scheduler_config.prediction_type == expected
    assert load_components(path, prediction_type="sample").scheduler_config.prediction_type == "sample"


def test_prediction_type_markers(single_files, tmp_path):
    sample = load_components(single_files["sd1", ".ckpt"], prediction_type="sample")
    save_single_file(sample, tmp_path / "sample.safetensors")
    assert load_components(tmp_path / "sample.safetensors").scheduler_config.prediction_type == "sample"
    with safe_open(str(single_files["sd2", ".safetensors"]), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v"
        assert "v_pred" in f.keys()
    assert load_components(single_files["sd2", ".ckpt"]).scheduler_config.prediction_type == "v_prediction"
    with safe_open(str(single_files["sd1", ".safetensors"]), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "epsilon"
        assert "v_pred" not in f.keys()


def test_sd2_unused_text_tensors_are_written_and_dropped(single_files):
    state = _read_single(single_files["sd2", ".ckpt"])
    layers = clip_text_model("sd2").config.num_hidden_layers
    prefix = "cond_stage_model.model."
    unused = [k for k in state if k.startswith(f"{prefix}transformer.resblocks.{layers}.")]
    assert len(unused) == 12 and all(not state[k].any() for k in unused)
    assert torch.equal(state[prefix + "text_projection"], torch.eye(128))
    assert state[prefix + "logit_scale"].shape == ()
    assert not any(k.startswith(f"{prefix}transformer.resblocks.{layers + 1}.") for k in state)


def test_load_makes_no_network_access(single_files, folders, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    for path in (single_files["sd2", ".safetensors"], single_files["sd1", ".ckpt"], folders["sd1"]):
        assert load_components(path).unet is not None


def _meta_single_file_keys(family: str) -> dict[str, tuple[int, ...]]:
    """Original-layout keys and shapes of a full-size preset, built on the meta device."""
    from types import SimpleNamespace

    from transformers import CLIPTextModel

    from ldm.models import AutoencoderKL, UNet, UNetConfig, VAEConfig
    from ldm.models.text_encoder import clip_config
    from ldm.schedulers import SchedulerConfig

    with torch.device("meta"):
        unet = UNet(UNetConfig.sd1() if family == "sd1" else UNetConfig.sd2())
        vae = AutoencoderKL(VAEConfig.sd())
        text = CLIPTextModel(clip_config(family))
    components = SimpleNamespace(
        unet=unet, vae=vae, text_encoder=text, text_encoder_2=None, family=family, scheduler_config=SchedulerConfig()
    )
    state = single_file_state(components)
    return {key: tuple(value.shape) for key, value in state.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_key_set_matches_diffusers_conversion(family):
    """The full-size SD 1.5 / 2.1 single-file key set maps, through diffusers' own converters, onto
    exactly the keys and shapes of diffusers' models of the released configs (all on meta)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ldm.models import UNetConfig, VAEConfig
    from ldm.models.text_encoder import clip_config

    shapes = _meta_single_file_keys(family)
    checkpoint = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    unet_config = (UNetConfig.sd1() if family == "sd1" else UNetConfig.sd2()).to_diffusers()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(VAEConfig.sd().to_diffusers())
        text = CLIPTextModel(clip_config(family))
    converted_unet = reference.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    converted_vae = reference.convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))
    if family == "sd1":
        converted_text = reference.convert_ldm_clip_checkpoint(checkpoint)
        converted_text.pop("text_model.embeddings.position_ids")
    else:
        converted_text = reference.convert_open_clip_checkpoint(text, checkpoint)
    converted_text = {k.removeprefix("text_model."): v for k, v in converted_text.items()}
    for converted, model in ((converted_unet, unet), (converted_vae, vae), (converted_text, text)):
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected

    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
    counts = {p: sum(k.startswith(p) for k in shapes) for p in prefixes}
    if family == "sd1":
        # The released v1-5-pruned-emaonly file: 686 U-Net, 248 VAE, 197 text encoder tensors.
        assert counts == {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 197}
        assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
        assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    else:
        assert shapes["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
        assert "cond_stage_model.model.transformer.resblocks.24.ln_1.weight" not in shapes
        assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320)
    assert keymap.UNET_PREFIX + "time_embed.0.weight" in shapes


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_detection_recovers_the_released_configs(family):
    import dataclasses

    from ldm.loading.detect import detect
    from ldm.models import UNetConfig, VAEConfig
    from ldm.models.text_encoder import clip_config

    def no_read(key):
        raise AssertionError(f"detection read {key}")

    shapes = _meta_single_file_keys(family)
    prediction = "v_prediction" if family == "sd2" else None
    found = detect(shapes, {}, None, no_read, prediction)
    assert found.family == family
    unet_preset = UNetConfig.sd1() if family == "sd1" else UNetConfig.sd2()
    assert UNetConfig.from_diffusers(found.unet) == unet_preset
    vae_preset = VAEConfig.sd() if family == "sd1" else dataclasses.replace(VAEConfig.sd(), sample_size=768)
    assert VAEConfig.from_diffusers(found.vae) == vae_preset
    reference_text = clip_config(family).to_dict()
    assert {k: found.text.to_dict()[k] for k in reference_text} == reference_text
    assert found.text_blocks_in_file == (12 if family == "sd1" else 24)
    if family == "sd2":
        # A ViT-H file written without the unused 24th block (diffusers' old script) keeps 23 layers.
        without_last = {k: v for k, v in shapes.items() if ".resblocks.23." not in k}
        assert detect(without_last, {}, None, no_read, prediction).text.num_hidden_layers == 23


def test_tokenizer_argument(single_files, folders):
    loaded = load_components(single_files["sd1", ".safetensors"], tokenizer="sd2")
    assert loaded.tokenizer.pad_token == "!"
    loaded = load_components(single_files["sd1", ".ckpt"], tokenizer=folders["sd2"] / "tokenizer")
    assert loaded.tokenizer.pad_token == "!"
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def _mappings_of(path) -> int:
    return sum(line.rstrip().endswith(str(path)) for line in open("/proc/self/maps"))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_each_network_of_a_single_safetensors_file_has_its_own_mapping(single_files):
    # So one network's weights can be freed while another runs (weights_after_use="release").
    path = single_files["sd1", ".safetensors"].resolve()
    gc.collect()
    before = _mappings_of(path)
    loaded = load_components(path)
    assert _mappings_of(path) == before + 3
    loaded.text_encoder.to("meta")
    gc.collect()
    assert _mappings_of(path) == before + 2
    assert torch.isfinite(loaded.unet.conv_in.weight).all()


def test_vae_only_loads_the_folders_vae_bit_identical(folders, tmp_path):
    from ldm.errors import CheckpointError
    from ldm.loading import load_vae_only

    vae = load_vae_only(folders["sd1"])
    full = load_components(folders["sd1"]).vae
    assert not vae.training
    assert vae.state_dict().keys() == full.state_dict().keys()
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in full.state_dict().items())
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        load_vae_only(tmp_path)


def test_vae_only_work_does_not_import_the_text_encoder_code(folders):
    # A fresh process: this one has imported transformers' CLIP model already.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from ldm.loading import load_vae_only\n"
        f"vae = load_vae_only({str(folders['sd1'])!r})\n"
        "assert vae.decoder is not None\n"
        "print(sorted(name for name in sys.modules if name.startswith('transformers.models.clip.modeling')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_model_hash_is_a1111s_short_sha256_and_is_cached_until_the_file_changes(tmp_path):
    import hashlib

    from ldm.loading.hashes import sha256, short_hash

    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights" * 1000)
    cache = tmp_path / "cache"
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert short_hash(model, cache) == expected[:10]
    entries = json.loads((cache / "hashes.json").read_text())
    assert entries[str(model.resolve())]["sha256"] == expected
    # A cached hash is read, not recomputed: a planted entry for the same size and time is believed...
    entries[str(model.resolve())]["sha256"] = "f" * 64
    (cache / "hashes.json").write_text(json.dumps(entries))
    assert sha256(model, cache) == "f" * 64
    # ...until the file changes.
    model.write_bytes(b"other weights" * 1000)
    assert sha256(model, cache) == hashlib.sha256(model.read_bytes()).hexdigest()
    (cache / "hashes.json").write_text("{damaged")
    assert sha256(model, cache) == hashlib.sha256(model.read_bytes()).hexdigest()


def _with_markers(path, out, markers, drop=(), keep_scheduler=False):
    """``path``'s tensors (less ``drop``) and metadata, plus ComfyUI's zero-size ``markers``, written as ``out``;
    without ldm's scheduler config unless ``keep_scheduler`` (community files carry none)."""
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if keep_scheduler or k != "ldm.scheduler_config"}
    state = {key: value for key, value in _read_single(path).items() if key not in drop}
    save_file({**state, **{key: torch.zeros(0) for key in markers}}, str(out), metadata=metadata)
    return out


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_the_ztsnr_marker_gives_zero_snr_betas_and_is_written_back(single_files, tmp_path, suffix):
    marked = load_components(_with_markers(single_files["sd2", ".safetensors"], tmp_path / "marked.safetensors", ["ztsnr"]))
    assert marked.scheduler_config.prediction_type == "v_prediction" and marked.scheduler_config.rescale_betas_zero_snr
    written = save_single_file(marked, tmp_path / f"again{suffix}")
    assert {"v_pred", "ztsnr"} <= _read_single(written).keys()
    if suffix == ".safetensors":  # the key says it: no scheduler config in the metadata
        with safe_open(str(written), "pt") as f:
            assert "ldm.scheduler_config" not in f.metadata()
    assert load_components(written).scheduler_config.rescale_betas_zero_snr
    assert not load_components(single_files["sd2", ".safetensors"]).scheduler_config.rescale_betas_zero_snr


def test_the_ztsnr_marker_needs_v_prediction(single_files, tmp_path):
    path = _with_markers(single_files["sd2", ".safetensors"], tmp_path / "eps.safetensors", ["ztsnr"], drop=["v_pred"])
    with pytest.raises(CheckpointError, match=r"has the ztsnr key \(zero terminal SNR\) but predicts epsilon") as raised:
        load_components(path, prediction_type="epsilon")
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)
    assert load_components(path, prediction_type="v_prediction").scheduler_config.rescale_betas_zero_snr


@pytest.mark.parametrize(("stated", "zero_snr"), [({}, True), ({"rescale_betas_zero_snr": False}, False)])
def test_a_scheduler_config_in_the_file_decides_over_the_ztsnr_key(single_files, tmp_path, stated, zero_snr):
    """ldm's own metadata leaves unset keys out: the key fills an unset rescaling, an explicit False stands."""
    import dataclasses

    from ldm.schedulers import SchedulerConfig

    model = load_components(single_files["sd2", ".safetensors"])
    scheduler = SchedulerConfig.sd_release("v_prediction").with_values(timestep_spacing="trailing", **stated)
    written = save_single_file(dataclasses.replace(model, scheduler_config=scheduler), tmp_path / "stated.safetensors")
    with safe_open(str(written), "pt") as f:
        assert ("rescale_betas_zero_snr" in json.loads(f.metadata()["ldm.scheduler_config"])) == bool(stated)
    marked = _with_markers(written, tmp_path / "marked.safetensors", ["ztsnr"], keep_scheduler=True)
    assert load_components(marked).scheduler_config.rescale_betas_zero_snr is zero_snr
