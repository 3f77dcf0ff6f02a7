"""Prompt editing, alternation and AND in a generation: the text states the U-Net reads at each step,
the guided prediction of sub-prompts, refusals, the infotext and the command line."""

from __future__ import annotations

import pytest
import torch
from test_lora_tags import micro_pipe
from test_training_support import one_torch_thread  # noqa: F401 - an autouse fixture
from test_txt2img_cli import FAST, model, run  # noqa: F401 - model is a fixture

from ldm.errors import SettingError
from ldm.guidance import ClassifierFreeGuidance, Conditioning
from ldm.images import read_parameters
from ldm.pipeline import stages
from ldm.prompts import encode_prompts
from ldm.settings import GenerationSettings

SETTINGS = {"width": 32, "height": 32, "guidance_scale": 3.0, "seed": 3}
CALL = {**SETTINGS, "output_type": "pt"}


@pytest.fixture(scope="module")
def pipe():
    return micro_pipe()


def recorded_texts(pipe, prompt, **call) -> list[torch.Tensor]:
    """The ``encoder_hidden_states`` of each U-Net call of ``pipe(prompt, **call)``."""
    texts = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: texts.append(args[2].clone()))
    try:
        pipe(prompt, **{**CALL, **call})
    finally:
        handle.remove()
    return texts


def encoded(pipe, *texts) -> torch.Tensor:
    """The text states of ``texts`` encoded together, as the pipeline encodes a call's texts: (len(texts), L, D)."""
    return encode_prompts(pipe.text_encoder, pipe.tokenizer, list(texts))


def test_prompt_editing_switches_the_text_at_a1111s_step(pipe):
    # [a red cat:a blue dog:0.5] over 4 steps: "until step 2", steps counted from 0 as A1111's CFGDenoiser does.
    texts = recorded_texts(pipe, "[a red cat:a blue dog:0.5]", num_inference_steps=4)
    first, second, empty = encoded(pipe, "a red cat", "a blue dog", "")
    assert len(texts) == 4
    for step, text in enumerate(texts):
        assert torch.equal(text[0], empty)  # the negative (unconditional) row, unchanged
        assert torch.equal(text[1], first if step <= 2 else second)


@torch.inference_mode()
def test_an_edited_prompt_gives_the_image_of_a_manual_loop_over_its_texts(pipe):
    settings = GenerationSettings(prompt="[a red cat:a blue dog:2]", num_inference_steps=4, **SETTINGS)
    call = stages.resolve(pipe, settings, None, None, None)
    timesteps = stages.prepare_timesteps(pipe, call)
    x = stages.initial_latents(pipe, call, timesteps)
    first, second, empty = encoded(pipe, "a red cat", "a blue dog", "")[:, None]
    for step, t in enumerate(timesteps):
        text = torch.cat([empty, first if step <= 2 else second])
        out_uncond, out_cond = pipe.unet(call.scheduler.scale_model_input(x, t), t, text).chunk(2)
        x = call.scheduler.step(out_uncond + 3.0 * (out_cond - out_uncond), t, x, generator=call.generators)
    image = pipe("[a red cat:a blue dog:2]", num_inference_steps=4, **CALL).images
    assert torch.equal(image, stages.decode(pipe, x))
    assert not torch.equal(image, pipe("a red cat", num_inference_steps=4, **CALL).images)


def test_alternation_cycles_per_step(pipe):
    texts = recorded_texts(pipe, "[a red cat|a blue dog]", num_inference_steps=5)
    first, second = encoded(pipe, "a red cat", "a blue dog")
    # A1111's schedule [[1, a], [2, b], [3, a], ...] read from step 0: a, a, b, a, b.
    assert [torch.equal(text[1], first) for text in texts] == [True, True, False, True, False]
    assert [torch.equal(text[1], second) for text in texts] == [False, False, True, False, True]


def test_the_negative_prompt_is_scheduled_too(pipe):
    texts = recorded_texts(pipe, "a cat", negative_prompt="[blurry:dark:1]", num_inference_steps=3)
    _, blurry, dark = encoded(pipe, "a cat", "blurry", "dark")
    assert [torch.equal(text[0], blurry) for text in texts] == [True, True, False]
    assert torch.equal(texts[2][0], dark)


def test_one_subprompt_of_weight_1_is_the_plain_prompt_bit_for_bit(pipe):
    plain = pipe("a red cat", num_inference_steps=2, **CALL).images
    assert torch.equal(pipe("a red cat :1", num_inference_steps=2, **CALL).images, plain)
    assert not torch.equal(pipe("a red cat :1.5", num_inference_steps=2, **CALL).images, plain)


def test_the_summed_guidance_with_one_subprompt_of_weight_1_is_plain_guidance_bit_for_bit():
    def network(x, t, text):
        return torch.sin(x.repeat(text.shape[0] // x.shape[0], 1, 1, 1) * text.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t)

    cond, uncond = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    x, t = torch.randn(2, 4, 5, 5), torch.tensor(0.3)
    plain = Conditioning.fixed(cond, uncond)
    summed = Conditioning(plain.states, plain.cond, plain.uncond, weights=((1.0, 1.0),))
    assert torch.equal(ClassifierFreeGuidance(network, summed, 7.3, 0.0, 1)(x, t), ClassifierFreeGuidance(network, plain, 7.3, 0.0, 1)(x, t))


def test_and_sums_the_guidance_of_its_subprompts_in_one_unet_call(pipe):
    settings = GenerationSettings(prompt="a red cat AND a blue dog :1.5", negative_prompt="dark", num_inference_steps=2, **SETTINGS)
    call = stages.resolve(pipe, settings, None, None, None)
    text = stages.encode_prompts(pipe, call)
    outputs = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: outputs.append(output))
    network = stages.in_network_format(pipe.unet, pipe.dtype, pipe.memory_formats.unet)
    x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    try:
        guided = stages.guided(network, call.settings, text, 2)(x, t)
    finally:
        handle.remove()
    [rows] = outputs  # the unconditional pass and both sub-prompts, one batch
    out_uncond, out_a, out_b = rows.chunk(3)
    assert torch.equal(guided, out_uncond + (out_a - out_uncond) * 3.0 + (out_b - out_uncond) * (1.5 * 3.0))
    a, b, dark = encoded(pipe, "a red cat", " a blue dog", "dark")
    assert torch.equal(text.both_at(0), torch.stack([dark, a, b]))


def test_a_batch_may_mix_numbers_of_subprompts(pipe):
    batch = pipe(["a red cat AND a blue dog", "a green bird"], num_inference_steps=2, **CALL).images
    alone = pipe("a green bird", num_inference_steps=2, **{**CALL, "seed": 4}).images
    torch.testing.assert_close(batch[1:], alone, rtol=0, atol=1e-5)  # its padding sub-prompt weighs 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"guidance_scale": 1.0}, "raise guidance_scale above 1"),
        ({"guidance_rescale": 0.5}, "drop guidance_fraction and guidance_rescale"),
        ({"guidance_fraction": 0.5}, "drop guidance_fraction and guidance_rescale"),
    ],
)
def test_subprompts_without_a_full_unconditional_pass_are_refused(pipe, change, message):
    settings = GenerationSettings(prompt="a AND b", num_inference_steps=2, **{**SETTINGS, **change})
    with pytest.raises(SettingError, match=message):
        stages.resolve(pipe, settings, None, None, None)


def test_the_infotext_keeps_the_prompt_as_typed(pipe):
    typed = "a [red|blue] [cat:dog:0.5] AND a bird :0.8"
    parameters = pipe(typed, num_inference_steps=2, **CALL).parameters[0]
    assert parameters.prompt == typed and "Old prompt editing timelines" not in parameters.extra


def test_an_edited_prompt_from_the_command_line_differs_from_its_first_text(model, tmp_path, capsys):  # noqa: F811
    for prompt, folder in (("[cat:dog:0.5]", "edited"), ("cat", "plain")):
        code, _, _ = run(capsys, prompt, "--model", model, "--seed", 1, "--out", tmp_path / folder, *FAST)
        assert code == 0
    edited, plain = (tmp_path / "edited" / "00000-1.png"), (tmp_path / "plain" / "00000-1.png")
    assert read_parameters(edited).prompt == "[cat:dog:0.5]"
    assert edited.read_bytes() != plain.read_bytes()


def test_editing_with_a_sampler_that_calls_the_network_twice_a_step_is_refused_and_a_plain_prompt_runs(pipe):
    """A1111 counts its edits in network calls; ldm's schedule counts one call per step, so a template that
    makes more calls (Heun: 2N - 1 for N steps) would switch at the wrong step: refused instead."""
    from diffusers import HeunDiscreteScheduler

    heun = HeunDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with pytest.raises(SettingError, match="makes 5 calls for 3 steps"):
        pipe("[a red cat:a blue dog:0.5]", scheduler=heun, num_inference_steps=3, seed=1, output_type="pt")
    assert pipe("a red cat", scheduler=heun, num_inference_steps=3, seed=1, output_type="pt").images.isfinite().all()
