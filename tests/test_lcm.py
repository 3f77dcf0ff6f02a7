"""Guidance-distilled (LCM) U-Nets: the guidance scale enters as an embedding, one U-Net pass per step,
and the numbers of diffusers' ``LatentConsistencyModelPipeline`` on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import diffusers_pipeline, diffusers_unet, lcm_pipeline

from ldm.errors import ConfigError, InputError, SettingError
from ldm.guidance import guidance_scale_embedding
from ldm.models import UNet, UNetConfig

COND_DIM = 32  # LCM's SD 1.5 U-Nets use 256; the tiny U-Net's time embedding is 32 wide
PROMPT = "a photo of a red cat"


def test_guidance_scale_embedding_is_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 0.5, 1.0, 7.5, -1.0])
    for dim in (256, 33):  # an odd width gets a zero column
        # get_guidance_scale_embedding uses nothing of the pipeline instance.
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_scale_embedding(w, dim), expected)


def test_the_denoiser_of_a_guidance_embedding_unet_is_one_pass_with_w_embedded():
    from ldm.guidance import Conditioning
    from ldm.pipeline.stages import guided
    from ldm.settings import GenerationSettings

    calls = []

    def network(x, t, text, timestep_cond=None):
        calls.append((text, timestep_cond))
        return x

    cond, uncond = torch.zeros(1, 77, 64), torch.ones(1, 77, 64)
    settings = GenerationSettings(prompt="a cat", guidance_scale=8.5)
    denoiser = guided(network, settings, Conditioning.fixed(cond, uncond), 4, guidance_embedding_dim=COND_DIM)
    denoiser(torch.zeros(1, 4, 8, 8), torch.tensor(500))
    [(text, condition)] = calls
    assert torch.equal(text, cond)  # the conditional text alone: no unconditional pass
    assert torch.equal(condition, guidance_scale_embedding(torch.tensor([7.5]), COND_DIM))  # w = scale - 1


@pytest.fixture(scope="module")
def lcm_unets():
    reference = diffusers_unet("sd1", time_cond_proj_dim=COND_DIM)
    ours = UNet(UNetConfig.from_diffusers(dict(reference.config))).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def test_unet_with_timestep_cond_equals_diffusers(lcm_unets):
    reference, ours = lcm_unets
    assert ours.config.time_cond_proj_dim == COND_DIM
    assert ours.time_embedding.cond_proj.weight.shape == (32, COND_DIM)  # diffusers' key, no bias
    assert UNetConfig.from_diffusers(ours.config.to_diffusers()) == ours.config
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 64, generator=generator)
    condition = guidance_scale_embedding(torch.tensor([7.5, 2.0]), COND_DIM)
    with torch.no_grad():
        expected = reference(sample, 500, encoder_hidden_states=context, timestep_cond=condition).sample
        got = ours(sample, torch.tensor([500]), context, timestep_cond=condition)
        unconditioned = ours(sample, torch.tensor([500]), context)
        expected_unconditioned = reference(sample, 500, encoder_hidden_states=context).sample
        one_row = ours(sample, torch.tensor([500]), context, timestep_cond=condition[:1])
        first_twice = ours(sample, torch.tensor([500]), context, timestep_cond=condition[:1].repeat(2, 1))
    assert (got - expected).abs().max() < 1e-5
    assert (unconditioned - expected_unconditioned).abs().max() < 1e-5
    assert (got - unconditioned).abs().max() > 1e-4
    assert torch.allclose(one_row, first_twice, atol=1e-6)  # one row serves every sample


def test_timestep_cond_of_the_wrong_shape_or_for_a_plain_unet_is_refused(lcm_unets):
    _, ours = lcm_unets
    sample, context = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 64)
    with pytest.raises(InputError, match=r"timestep_cond has shape \(1, 16\); this U-Net takes \(1, 32\)$"):
        ours(sample, 500, context, timestep_cond=torch.zeros(1, 16))
    plain = UNet(UNetConfig.tiny()).eval()
    with pytest.raises(InputError, match="takes no timestep_cond"):
        plain(sample, 500, context, timestep_cond=torch.zeros(1, COND_DIM))
    with pytest.raises(ConfigError, match="'time_cond_proj_dim'=0 is out of range"):
        UNetConfig.from_diffusers({**UNetConfig.tiny().to_diffusers(), "time_cond_proj_dim": 0})


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    """A diffusers folder of an LCM model, and the diffusers pipeline it was saved from."""
    reference = lcm_pipeline(COND_DIM)
    folder = tmp_path_factory.mktemp("lcm") / "model"
    reference.save_pretrained(folder)
    return folder, reference


def unet_batches(pipe) -> list[int]:
    """The batch of each U-Net call ``pipe`` makes from now on."""
    batches: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    return batches


def test_lcm_folder_samples_as_diffusers_with_one_pass_per_step(lcm_folder):
    from diffusers import LCMScheduler

    from ldm.pipeline import Pipeline

    folder, reference = lcm_folder
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.unet.config.time_cond_proj_dim == COND_DIM
    batches = unet_batches(pipe)
    for scale in (8.5, 1.0):
        generator = torch.Generator().manual_seed(0)
        expected = reference(PROMPT, num_inference_steps=4, guidance_scale=scale, generator=generator, output_type="np").images
        scheduler = LCMScheduler.from_config(reference.scheduler.config)
        got = pipe(PROMPT, num_inference_steps=4, guidance_scale=scale, seed=0, scheduler=scheduler, output_type="np").images
        assert np.abs(got - expected).max() < 1e-4, scale
    assert batches == [1] * 8  # one conditional pass per step, never a second (unconditional) one


def test_an_lcm_folder_without_generation_config_samples_as_diffusers_defaults(lcm_folder):
    """diffusers' LatentConsistencyModelPipeline runs the folder's LCMScheduler, 4 steps and guidance 8.5 when
    a call gives none; ldm recommends the same for such a folder, and a call's own choice still wins."""
    from ldm.pipeline import Pipeline

    folder, reference = lcm_folder
    assert not (folder / "generation_config.json").exists()
    pipe = Pipeline.from_pretrained(folder)
    expected = reference(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np").images
    result = pipe(PROMPT, seed=0, output_type="np")
    assert np.abs(result.images - expected).max() < 1e-4
    s = result.settings.settings
    assert (s.scheduler, s.num_inference_steps, s.guidance_scale, result.settings.sampler) == ("lcm", 4, 8.5, "LCM")
    own = pipe(PROMPT, seed=0, scheduler="euler", num_inference_steps=2, output_type="latent").settings
    assert (own.settings.scheduler, own.settings.num_inference_steps, own.sampler) == ("euler", 2, "Euler")


def test_a_plain_folder_saved_with_an_lcm_scheduler_recommends_lcm_unguided(tmp_path):
    from diffusers import LCMScheduler

    from ldm.loading import load_components

    reference = diffusers_pipeline()
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    reference.save_pretrained(tmp_path / "fused")
    assert load_components(tmp_path / "fused").generation_config == {"scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0}
    (tmp_path / "fused" / "generation_config.json").write_text('{"num_inference_steps": 6}')
    assert load_components(tmp_path / "fused").generation_config == {"num_inference_steps": 6}


def test_speed_ups_run_on_an_lcm_unet(lcm_folder):
    from diffusers import LCMScheduler

    from ldm.pipeline import Pipeline

    folder, reference = lcm_folder
    pipe = Pipeline.from_pretrained(folder)
    batches = unet_batches(pipe)
    scheduler = LCMScheduler.from_config(reference.scheduler.config)
    common = dict(num_inference_steps=4, guidance_scale=8.5, seed=0, scheduler=scheduler, output_type="np")
    plain = pipe(PROMPT, **common).images
    cached = pipe(PROMPT, deepcache_interval=2, token_merging=0.5, **common).images
    assert np.isfinite(cached).all() and np.abs(cached - plain).max() > 0
    assert batches == [1] * 8


def test_a_negative_prompt_or_cfg_option_for_an_lcm_model_is_refused(lcm_folder):
    from ldm.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(lcm_folder[0])
    for option in ({"negative_prompt": "blurry"}, {"guidance_rescale": 0.5}, {"guidance_fraction": 0.5}):
        with pytest.raises(SettingError, match="takes the guidance scale as an embedding") as raised:
            pipe(PROMPT, num_inference_steps=1, **option)
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_an_lcm_model_comes_back_from_a_single_file(suffix, lcm_folder, tmp_path):
    from ldm.loading import load_components, save_single_file

    model = load_components(lcm_folder[0])
    back = load_components(save_single_file(model, tmp_path / f"lcm{suffix}"))
    assert back.unet.config == model.unet.config and back.unet.config.time_cond_proj_dim == COND_DIM
    state = model.unet.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in back.unet.state_dict().items())


def test_a_controlnet_steers_a_guidance_embedding_unet_as_diffusers(lcm_folder, tmp_path):
    """The guidance embedding is the U-Net's alone (diffusers' ControlNet pipeline hands the ControlNet no
    timestep_cond): one pass per step, the ControlNet's residuals added, diffusers' image."""
    import diffusers
    from test_controlnet import control_image, random_controlnet

    from ldm.control import ControlUnit
    from ldm.pipeline import Pipeline

    folder, reference = lcm_folder
    controlnet = random_controlnet(diffusers_unet("sd1"), seed=3)  # the LCM U-Net's shapes, without its cond_proj
    controlnet.save_pretrained(tmp_path / "cn")
    parts = {name: getattr(reference, name) for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    theirs_pipe = diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, safety_checker=None,
                                                              feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    theirs_pipe.set_progress_bar_config(disable=True)
    image = control_image(4, (64, 64))
    call = dict(num_inference_steps=4, guidance_scale=8.5, height=64, width=64, output_type="np")
    theirs = theirs_pipe(PROMPT, image=image, generator=torch.Generator().manual_seed(1), **call).images
    pipe = Pipeline.from_pretrained(folder)
    scheduler = diffusers.LCMScheduler.from_config(reference.scheduler.config)
    ours = pipe(PROMPT, seed=1, scheduler=scheduler, control=ControlUnit(tmp_path / "cn", image), **call).images
    assert np.abs(ours - theirs).max() < 1e-4
    plain = pipe(PROMPT, seed=1, scheduler=scheduler, **call).images
    assert np.abs(plain - theirs).max() > 1e-2
