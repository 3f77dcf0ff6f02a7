"""SDXL's networks against diffusers and transformers on the same random weights: the U-Net (base and
refiner shapes, with the text_time added conditioning), the second text encoder read as SDXL reads it,
its tokenizer, and the VAE's force_upcast."""

from __future__ import annotations

import pytest
import tiny_sdxl
import torch

from ldm.errors import InputError
from ldm.models import UNet, UNetConfig, VAEConfig

# The released unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 (diffusers 0.19).
RELEASED_UNETS = {
    "base": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
        "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
        "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
        "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
        "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
        "use_linear_projection": True,
    },
    "refiner": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [6, 12, 24, 24],
        "block_out_channels": [384, 768, 1536, 1536], "center_input_sample": False, "class_embed_type": None,
        "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 1280,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
        "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2560,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
        "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": 4,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None, "use_linear_projection": True,
    },
}  # fmt: skip
PRESETS = {"base": UNetConfig.sdxl, "refiner": UNetConfig.sdxl_refiner}
MICRO = {"base": [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], "refiner": [1024.0, 1024.0, 0.0, 0.0, 6.0]}


@pytest.fixture(scope="module", params=["base", "refiner"])
def unets(request):
    """(kind, diffusers' U-Net, ours with its weights)."""
    reference = tiny_sdxl.unet(request.param)
    ours = UNet(UNetConfig.from_diffusers(dict(reference.config))).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return request.param, reference, ours


def _inputs(kind: str, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(rows, 77, tiny_sdxl.unet(kind).config.cross_attention_dim, generator=g)
    pooled = torch.randn(rows, tiny_sdxl.POOLED_WIDTH, generator=g)
    return context, pooled


def test_unet_matches_diffusers(unets):
    kind, reference, ours = unets
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context, pooled = _inputs(kind, 2)
    time_ids = torch.tensor([MICRO[kind], [512.0, 768.0, 32.0, 16.0, *MICRO[kind][4:]]])
    with torch.no_grad():
        expected = reference(x, 421, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = ours(x, 421, context, text_embeds=pooled, time_ids=time_ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert expected.abs().mean() > 0.1


def test_unet_shares_one_sample_between_guidance_rows(unets):
    """Guidance passes each latent once with k text rows (each with its pooled row): as diffusers fed the
    latent k times. The time_ids may come once for all rows."""
    kind, reference, ours = unets
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    context, pooled = _inputs(kind, 2, seed=3)
    time_ids = torch.tensor([MICRO[kind]])
    with torch.no_grad():
        expected = reference(
            x.repeat(2, 1, 1, 1), 10, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(2, 1)}
        ).sample
        got = ours(x, torch.tensor(10), context, text_embeds=pooled, time_ids=time_ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(got[0], got[1])  # the pooled rows differ, so do the outputs


def test_unet_refuses_missing_or_misshapen_added_conditioning(unets):
    kind, _, ours = unets
    x = torch.zeros(1, 4, 8, 8)
    context, pooled = _inputs(kind, 1)
    time_ids = torch.tensor([MICRO[kind]])
    with pytest.raises(InputError, match="needs text_embeds"):
        ours(x, 1, context)
    with pytest.raises(InputError, match="embed to .* values; this U-Net takes"):
        ours(x, 1, context, text_embeds=pooled, time_ids=time_ids[:, :-1])
    with pytest.raises(InputError, match="one pooled embedding per text row"):
        ours(x, 1, context, text_embeds=pooled.repeat(2, 1), time_ids=time_ids)
    plain = UNet(UNetConfig.tiny()).eval()
    with pytest.raises(InputError, match="not an SDXL U-Net"):
        plain(x, 1, torch.zeros(1, 77, 64), text_embeds=pooled, time_ids=time_ids)


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_released_unet_configs_are_the_presets_and_build_diffusers_shapes(kind):
    from diffusers import UNet2DConditionModel

    config = UNetConfig.from_diffusers(RELEASED_UNETS[kind])
    assert config == PRESETS[kind]()
    assert UNetConfig.from_diffusers(config.to_diffusers()) == config
    with torch.device("meta"):
        ours = UNet(config)
        reference = UNet2DConditionModel.from_config(config.to_diffusers())
    shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    assert shapes == {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    if kind == "base":  # SDXL base's U-Net: 2,567,463,684 parameters
        assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684


def test_unet_config_refuses_half_an_added_conditioning():
    from ldm.errors import ConfigError

    with pytest.raises(ConfigError, match="needs 'addition_time_embed_dim'"):
        UNetConfig.from_diffusers({**RELEASED_UNETS["base"], "addition_time_embed_dim": None})
    with pytest.raises(ConfigError, match="addition_embed_type"):
        UNetConfig.from_diffusers({**RELEASED_UNETS["base"], "addition_embed_type": "text"})
    with pytest.raises(ConfigError, match="transformer_layers_per_block"):
        UNetConfig.from_diffusers({**RELEASED_UNETS["base"], "transformer_layers_per_block": [1, 2]})


# --- text encoders -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_pipeline():
    return tiny_sdxl.pipeline("base")


def test_text_states_and_pooled_output_match_diffusers_encode_prompt(reference_pipeline):
    """SDXL's conditioning from ldm's readings of the two encoders, tokenized by ldm's shipped tokenizers,
    equals diffusers' ``encode_prompt``: both penultimate layers side by side, bigG's pooled projection."""
    from ldm.models.text_encoder import load_tokenizer, load_tokenizer_2, sdxl_states, sdxl_states_and_pooled

    prompts = ["a red cube on a table", "an astronaut riding a horse, photograph"]
    with torch.no_grad():
        embeds, _, pooled, _ = reference_pipeline.encode_prompt(prompts, do_classifier_free_guidance=False)

        def ids(tokenizer):
            return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

        states_1 = sdxl_states(reference_pipeline.text_encoder, ids(load_tokenizer("sdxl")))
        states_2, ours_pooled = sdxl_states_and_pooled(reference_pipeline.text_encoder_2, ids(load_tokenizer_2("sdxl")))
    torch.testing.assert_close(torch.cat([states_1, states_2], dim=-1), embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_pooled, pooled, atol=1e-5, rtol=0)
    assert ours_pooled.shape == (2, tiny_sdxl.POOLED_WIDTH)


def test_pooled_output_is_the_projected_final_normed_eos_token(reference_pipeline):
    """The pooled output read from the model's parts: OpenCLIP's ``ln_final(x)[eos] @ text_projection``."""
    from ldm.models.text_encoder import load_tokenizer_2, sdxl_states_and_pooled

    encoder = reference_pipeline.text_encoder_2
    ids = load_tokenizer_2("sdxl")(["two cats"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        _, pooled = sdxl_states_and_pooled(encoder, ids)
        last = encoder.text_model(ids).last_hidden_state  # final-layer-normed
        eos = int((ids[0] == 49407).nonzero()[0])
        torch.testing.assert_close(pooled[0], encoder.text_projection(last[0, eos]), atol=1e-6, rtol=0)


def test_clip_skip_reads_earlier_layers_and_is_bounded(reference_pipeline):
    from ldm.models.text_encoder import sdxl_states

    encoder = reference_pipeline.text_encoder  # 3 layers
    ids = torch.randint(0, 49406, (1, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states
        assert torch.equal(sdxl_states(encoder, ids, clip_skip=1), hidden[-3])
        with pytest.raises(InputError, match="clip_skip"):
            sdxl_states(encoder, ids, clip_skip=2)


def test_bigg_config_is_the_released_text_encoder_2():
    from transformers import CLIPTextModelWithProjection

    from ldm.models.text_encoder import clip_config, clip_config_2

    released = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                "hidden_act": "gelu", "projection_dim": 1280, "max_position_embeddings": 77, "vocab_size": 49408,
                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # fmt: skip
    config = clip_config_2("sdxl")
    assert {key: getattr(config, key) for key in released} == released
    assert clip_config_2("sdxl-refiner").to_dict() == config.to_dict()
    assert clip_config("sdxl").to_dict() == clip_config("sd1").to_dict()  # CLIP ViT-L, as SD 1.x's
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 695  # OpenCLIP ViT-bigG/14's text tower


def test_tokenizer_2_differs_from_tokenizer_in_its_pad_token_alone():
    from ldm.models.text_encoder import load_tokenizer, load_tokenizer_2

    first, second = load_tokenizer("sdxl"), load_tokenizer_2("sdxl")
    assert (first.pad_token, second.pad_token, second.pad_token_id) == ("<|endoftext|>", "!", 0)
    text = "a photo of a cat, (high detail)"
    a = first(text, padding="max_length", max_length=77).input_ids
    b = second(text, padding="max_length", max_length=77).input_ids
    n = len(first(text).input_ids)
    assert a[:n] == b[:n] and a[n:] == [49407] * (77 - n) and b[n:] == [0] * (77 - n)
    assert load_tokenizer_2("sdxl-refiner").pad_token == "!"


# --- VAE -----------------------------------------------------------------------------------------------


def test_sdxl_vae_config_reads_scaling_and_force_upcast():
    config = VAEConfig.from_diffusers(dict(tiny_sdxl.vae().config))
    assert (config.scaling_factor, config.force_upcast) == (0.13025, True)
    assert VAEConfig.from_diffusers(config.to_diffusers()) == config
    assert VAEConfig.from_diffusers({"scaling_factor": 0.18215}).force_upcast is False  # SD's configs omit it
    assert VAEConfig.sdxl().scaling_factor == 0.13025 and VAEConfig.sdxl().force_upcast


@pytest.mark.parametrize("force_upcast", [True, False])
def test_fp16_decode_runs_in_fp32_when_the_vae_asks(force_upcast):
    """As diffusers' SDXL pipelines upcast the VAE: fp16 weights decode in fp32 and are fp16 again after.

    ldm refuses fp16 pipelines on the CPU, so the decode stage runs here on a stand-in for the pipeline
    that holds the set-up it reads (the VAE, the dtype, residency without offload, decode mode).
    """
    import copy
    from dataclasses import replace
    from types import SimpleNamespace

    from ldm.models import AutoencoderKL
    from ldm.pipeline import stages
    from ldm.residency import Residency

    reference = tiny_sdxl.vae()
    vae = AutoencoderKL(replace(VAEConfig.from_diffusers(dict(reference.config)), force_upcast=force_upcast)).eval()
    vae.load_state_dict(reference.state_dict(), strict=True)
    vae.half()
    fp32 = copy.deepcopy(vae).float()  # the same fp16-rounded weights, in fp32
    pipe = SimpleNamespace(
        vae=vae, dtype=torch.float16, residency=Residency(torch.device("cpu")), memory_formats=SimpleNamespace(vae=torch.contiguous_format),
        setup=SimpleNamespace(decode_mode="full"),
    )  # fmt: skip
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = stages.decode(pipe, latents)
        in_fp32 = (fp32.decode(latents / vae.config.scaling_factor).float() / 2 + 0.5).clamp(0, 1)
    assert next(vae.parameters()).dtype == torch.float16
    assert torch.equal(images, in_fp32) is force_upcast
    torch.testing.assert_close(images, in_fp32, atol=2e-2, rtol=0)
