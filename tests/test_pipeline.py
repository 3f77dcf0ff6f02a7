"""Pipeline behaviour on tiny random-weight SD-shaped models: seeds, guidance, outputs, errors, dtypes.

Parity with diffusers' pipelines through the loaders is in test_pipeline_parity.py.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import diffusers_pipeline, ldm_pipeline

from ldm.errors import ConfigError, InputError
from ldm.guidance import rescale_guidance
from ldm.pipeline import NonFiniteOutputError, Pipeline, ReleasedWeightsError
from ldm.schedulers import create

SIZE = dict(height=64, width=64, num_inference_steps=3)


@pytest.fixture(scope="module")
def reference():
    return diffusers_pipeline("sd1")


@pytest.fixture()
def pipe(reference):
    return ldm_pipeline(reference)


def count_unet_batches(pipe: Pipeline) -> list[int]:
    """The rows each U-Net call returns: images x passes (2 with guidance)."""
    sizes: list[int] = []
    pipe.unet.register_forward_hook(lambda module, args, output: sizes.append(output.shape[0]))
    return sizes


# --- seeds ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheduler, eta", [("ddim", None), ("ddim", 1.0), ("ddpm", None), ("euler-ancestral", None), ("dpm-solver++-sde", None)]
)
def test_image_i_of_a_batch_equals_a_single_image_with_seed_plus_i(pipe, scheduler, eta):
    batch = pipe("a red square", seed=100, num_images_per_prompt=3, scheduler=scheduler, eta=eta, output_type="pt", **SIZE)
    assert batch.seeds == [100, 101, 102]
    for i in range(3):
        single = pipe("a red square", seed=100 + i, scheduler=scheduler, eta=eta, output_type="pt", **SIZE)
        assert single.seeds == [100 + i]
        torch.testing.assert_close(batch.images[i : i + 1], single.images, rtol=0, atol=1e-5)
    assert (batch.images[0] - batch.images[1]).abs().max() > 1e-3


def test_several_prompts_are_ordered_prompt_major(pipe):
    out = pipe(["a cat", "a dog"], seed=7, num_images_per_prompt=2, output_type="pt", **SIZE)
    assert out.seeds == [7, 8, 9, 10]
    dog = pipe("a dog", seed=9, output_type="pt", **SIZE)
    torch.testing.assert_close(out.images[2:3], dog.images, rtol=0, atol=1e-5)


def test_same_seed_same_image_and_unseeded_runs_report_their_seed(pipe):
    first = pipe("a cat", seed=5, output_type="pt", **SIZE)
    second = pipe("a cat", seed=5, output_type="pt", **SIZE)
    assert torch.equal(first.images, second.images)
    unseeded = pipe("a cat", num_images_per_prompt=2, output_type="pt", **SIZE)
    s = unseeded.seeds[0]
    assert unseeded.seeds == [s, s + 1] and 0 <= s < 2**32
    again = pipe("a cat", seed=s, num_images_per_prompt=2, output_type="pt", **SIZE)
    assert torch.equal(unseeded.images, again.images)


def test_initial_noise_is_drawn_per_image_on_the_cpu(pipe):
    latents = pipe("a cat", seed=11, output_type="latent", **{**SIZE, "num_inference_steps": 1})
    given = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(11))
    from_latents = pipe("a cat", latents=given, seed=11, output_type="latent", **{**SIZE, "num_inference_steps": 1})
    torch.testing.assert_close(latents.images, from_latents.images, rtol=0, atol=0)


def test_generators_instead_of_a_seed(pipe):
    generators = [torch.Generator("cpu").manual_seed(3), torch.Generator("cpu").manual_seed(4)]
    out = pipe("a cat", generator=generators, num_images_per_prompt=2, output_type="pt", **SIZE)
    assert out.seeds is None
    seeded = pipe("a cat", seed=3, num_images_per_prompt=2, output_type="pt", **SIZE)
    torch.testing.assert_close(out.images, seeded.images, rtol=0, atol=0)


# --- guidance ---------------------------------------------------------------------------------------


def test_guidance_batches_both_passes_in_one_unet_call(pipe):
    sizes = count_unet_batches(pipe)
    samples: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda module, args: samples.append(args[0].shape[0]))
    pipe("a cat", seed=1, num_images_per_prompt=2, guidance_scale=7.5, **SIZE)
    assert sizes == [4, 4, 4]
    assert samples == [2, 2, 2]  # each latent is passed once and shared by its two passes


def test_guidance_scale_at_most_one_runs_the_conditional_pass_alone(pipe, reference):
    sizes = count_unet_batches(pipe)
    ours = pipe("a cat", negative_prompt="ignored", seed=2, guidance_scale=1.0, scheduler="ddim", output_type="np", **SIZE)
    assert sizes == [1, 1, 1]
    theirs = reference(
        "a cat", generator=torch.Generator("cpu").manual_seed(2), guidance_scale=1.0, output_type="np", **SIZE
    ).images
    assert np.abs(ours.images - theirs).max() < 1e-4


def test_rescale_guidance_formula():
    torch.manual_seed(0)
    cond = torch.randn(2, 4, 8, 8)
    guided = 3 * torch.randn(2, 4, 8, 8) + 1
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)
    full = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    torch.testing.assert_close(full / guided, (full / guided)[:, :1, :1, :1].expand_as(full))
    half = rescale_guidance(guided, cond, 0.5)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * guided)


def test_guidance_rescale_matches_diffusers(pipe, reference):
    ours = pipe("a cat", seed=4, guidance_rescale=0.7, scheduler="ddim", output_type="np", **SIZE).images
    theirs = reference(
        "a cat", generator=torch.Generator("cpu").manual_seed(4), guidance_rescale=0.7, output_type="np", **SIZE
    ).images
    assert np.abs(ours - theirs).max() < 1e-4
    plain = pipe("a cat", seed=4, scheduler="ddim", output_type="np", **SIZE).images
    assert np.abs(ours - plain).max() > 1e-4


# --- prompts ----------------------------------------------------------------------------------------


def test_long_prompts_reach_the_unet_uncut(pipe):
    contexts: list[torch.Size] = []
    pipe.unet.register_forward_hook(lambda module, args, output: contexts.append(args[2].shape))
    long_prompt = " ".join(["cat"] * 90)
    long = pipe(long_prompt, seed=3, output_type="pt", **SIZE)
    assert contexts[0] == (2, 154, 64)
    cut = pipe(" ".join(["cat"] * 75), seed=3, output_type="pt", **SIZE)
    assert (long.images - cut.images).abs().max() > 1e-4


def test_weighting_changes_the_image_and_weight_one_does_not(pipe):
    plain = pipe("a red cat", seed=3, output_type="pt", **SIZE).images
    unit = pipe("a (red:1.0) cat", seed=3, output_type="pt", **SIZE).images
    weighted = pipe("a (red:1.6) cat", seed=3, output_type="pt", **SIZE).images
    assert torch.equal(plain, unit)
    assert (plain - weighted).abs().max() > 1e-4


# --- outputs ----------------------------------------------------------------------------------------


def test_output_types_agree(pipe):
    kwargs = dict(seed=9, num_images_per_prompt=2, **SIZE)
    pt = pipe("a cat", output_type="pt", **kwargs).images
    np_images = pipe("a cat", output_type="np", **kwargs).images
    pil = pipe("a cat", output_type="pil", **kwargs).images
    latent = pipe("a cat", output_type="latent", **kwargs).images
    assert pt.shape == (2, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    assert np_images.shape == (2, 64, 64, 3) and np_images.dtype == np.float32
    np.testing.assert_array_equal(np_images, pt.permute(0, 2, 3, 1).numpy())
    assert [image.size for image in pil] == [(64, 64)] * 2
    np.testing.assert_array_equal(np.asarray(pil[1]), (np_images[1] * 255).round().astype(np.uint8))
    assert latent.shape == (2, 4, 8, 8)
    torch.testing.assert_close(pipe.decode_latents(latent), pt, rtol=0, atol=0)


def test_callback_gets_the_x0_each_step_moved_toward(pipe):
    """DDIM (eta 0) moves x_t to sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps with eps from x_t and x0
    (Song et al. 2021, eq. 12): the callback's x0 is the one the step used."""
    seen = []
    pipe("a cat", seed=1, scheduler="ddim", callback=lambda i, t, x, x0: seen.append((int(t), x, x0)), **SIZE)
    abar = create("ddim", pipe.scheduler_config).process.alphas_cumprod.double()
    x_t = randn_like_first_latents(pipe)
    for (t, x_prev, x0), (t_prev, _, _) in zip(seen, seen[1:] + [(None, None, None)]):
        ab, ab_prev = abar[t], abar[t_prev] if t_prev is not None else abar[0]
        eps = (x_t.double() - ab.sqrt() * x0.double()) / (1 - ab).sqrt()
        torch.testing.assert_close(x_prev.double(), ab_prev.sqrt() * x0.double() + (1 - ab_prev).sqrt() * eps, rtol=0, atol=1e-5)
        x_t = x_prev
    assert len(seen) == 3


def randn_like_first_latents(pipe) -> torch.Tensor:
    """The starting latents of seed 1 at SIZE (the seed rule: one CPU generator per image)."""
    return torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(1))


def test_callback_sees_every_step(pipe):
    seen = []
    pipe("a cat", seed=1, callback=lambda i, t, x, x0: seen.append((i, int(t), tuple(x.shape))), **SIZE)
    assert [i for i, _, _ in seen] == [0, 1, 2]
    steps = [t for _, t, _ in seen]
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == 3
    assert all(shape == (1, 4, 8, 8) for _, _, shape in seen)


def test_default_size_comes_from_the_unet(pipe):
    out = pipe("a cat", seed=1, num_inference_steps=1, output_type="latent")
    factor = pipe.vae.config.downsample_factor
    assert out.images.shape[-1] * factor == pipe.unet.config.sample_size * factor


def test_sliced_vae_decode_matches_the_full_decode(pipe):
    latent = pipe("a cat", seed=1, num_images_per_prompt=2, output_type="latent", **SIZE).images
    full = pipe.decode_latents(latent)
    pipe.configure(decode_mode="sliced")
    torch.testing.assert_close(pipe.decode_latents(latent), full, rtol=0, atol=1e-5)


def test_tiled_vae_decode_decodes_the_scaled_latents_tile_by_tile(pipe, monkeypatch):
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    full = pipe.decode_latents(latent)
    # Tiles of 4 latent pixels overlapping by 2: the 8 x 8 latents decode as 3 x 3 tiles. (The default
    # 64-pixel tile holds these latents whole; test_models_vae.py bounds multi-tile against plain decoding.)
    monkeypatch.setattr(pipe.vae, "decode_tiled", functools.partial(pipe.vae.decode_tiled, tile=4, overlap=2))
    tiles = count_decoder_tiles(pipe)
    pipe.configure(decode_mode="tiled")
    got = pipe.decode_latents(latent)
    assert tiles == [(2, 4, 4)] * 9
    with torch.no_grad():
        expected = (pipe.vae.decode_tiled(latent / pipe.vae.config.scaling_factor) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got - full).abs().max() > 1e-3  # tiles normalized on their own: not the full decode


def count_decoder_tiles(pipe: Pipeline) -> list[tuple[int, int, int]]:
    """(batch, height, width) of each latent tile the VAE decoder runs on."""
    tiles: list[tuple[int, int, int]] = []
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: tiles.append((args[0].shape[0], *args[0].shape[-2:])))
    return tiles


def test_sliced_attention_gives_the_same_image(pipe):
    reference_image = pipe("a cat", seed=1, output_type="pt", **SIZE).images
    pipe.configure(attention="sliced", attention_slice_size=1)
    torch.testing.assert_close(pipe("a cat", seed=1, output_type="pt", **SIZE).images, reference_image, rtol=0, atol=1e-5)


# --- img2img ----------------------------------------------------------------------------------------


def gradient_image(size: int = 64) -> Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    array = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 80.0)], -1)
    return Image.fromarray(array.astype(np.uint8))


def test_img2img_runs_strength_times_steps(pipe):
    sizes = count_unet_batches(pipe)
    out = pipe("a cat", init_image=gradient_image(), strength=0.5, seed=1, num_inference_steps=4, output_type="pt")
    assert len(sizes) == 2 and out.images.shape == (1, 3, 64, 64)


def test_img2img_size_follows_the_image_rounded_to_8(pipe, tmp_path):
    path = tmp_path / "init.png"
    gradient_image(70).save(path)
    out = pipe("a cat", init_image=path, strength=0.5, seed=1, num_inference_steps=2, output_type="pt")
    assert out.images.shape == (1, 3, 64, 64)


def test_init_images_are_read_upright_and_16_bit_greyscale_is_scaled(pipe, tmp_path):
    sideways = tmp_path / "sideways.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated by 90 degrees
    gradient_image(64).crop((0, 0, 64, 32)).save(sideways, exif=exif)
    out = pipe("a cat", init_image=sideways, strength=0.5, seed=1, num_inference_steps=2, output_type="pt")
    assert out.images.shape == (1, 3, 64, 32)  # 32 wide, 64 high, as a viewer shows it

    grey8, grey16 = tmp_path / "grey8.png", tmp_path / "grey16.png"
    ramp = np.linspace(0, 255, 64).round()[None, :].repeat(64, 0)
    Image.fromarray(ramp.astype(np.uint8)).save(grey8)
    Image.fromarray((ramp * 257).astype(np.uint16)).save(grey16)
    kwargs = dict(strength=0.5, seed=1, num_inference_steps=2, output_type="pt")
    torch.testing.assert_close(pipe("a cat", init_image=grey16, **kwargs).images, pipe("a cat", init_image=grey8, **kwargs).images)


def test_img2img_batch_determinism(pipe):
    kwargs = dict(init_image=gradient_image(), strength=0.75, num_inference_steps=4, output_type="pt")
    batch = pipe("a cat", seed=20, num_images_per_prompt=2, **kwargs).images
    single = pipe("a cat", seed=21, **kwargs).images
    torch.testing.assert_close(batch[1:], single, rtol=0, atol=1e-5)


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"height": 60}, InputError, "multiple of 8"),
        ({"width": 0}, InputError, "multiple of 8"),
        ({"num_inference_steps": 0}, InputError, "num_inference_steps"),
        ({"num_images_per_prompt": 0}, InputError, "num_images_per_prompt"),
        ({"output_type": "jpeg"}, InputError, "output_type"),
        ({"negative_prompt": ["a", "b"]}, InputError, "negative prompts"),
        ({"seed": 1, "generator": torch.Generator("cpu")}, InputError, "either seed or generator"),
        ({"seed": -2}, InputError, "seed"),
        ({"scheduler": "plms"}, InputError, "unknown scheduler 'plms'"),
        ({"scheduler": "euler", "eta": 0.5}, InputError, "eta does not apply to scheduler euler; it applies to ddim"),
        ({"latents": torch.zeros(1, 4, 4, 4)}, InputError, "latents have shape"),
        ({"init_image": Image.new("RGB", (64, 64)), "strength": 0.0}, InputError, "strength"),
        ({"init_image": Image.new("RGB", (64, 64)), "strength": 1.5}, InputError, "strength"),
        ({"init_image": Image.new("RGB", (64, 64)), "strength": 0.1}, InputError, "no step"),
        ({"init_image": "/nonexistent/init.png"}, InputError, "does not exist"),
        ({"init_image": Image.new("RGB", (64, 64)), "latents": torch.zeros(1, 4, 8, 8)}, InputError, "not both"),
        ({"guidance_rescale": 1.5}, InputError, "guidance_rescale"),
        ({"prompt": []}, InputError, "empty"),
        # Non-finite numbers: NaN or -inf guidance made an unguided image, +inf failed after every step.
        ({"guidance_scale": float("nan")}, InputError, "guidance_scale must be a finite number"),
        ({"guidance_scale": float("inf")}, InputError, "guidance_scale must be a finite number"),
        ({"guidance_scale": float("-inf")}, InputError, "guidance_scale must be a finite number"),
        ({"guidance_rescale": float("nan")}, InputError, "guidance_rescale must be a finite number"),
        ({"scheduler": "ddim", "eta": float("inf")}, InputError, "eta must be a finite number"),
        ({"scheduler": "ddim", "eta": -0.5}, InputError, "eta must be 0 or more"),
        ({"init_image": Image.new("RGB", (64, 64)), "strength": float("nan")}, InputError, "strength must be a finite"),
        ({"guidance_fraction": float("nan")}, InputError, "guidance_fraction must be a finite"),
        ({"token_merging": float("inf")}, InputError, "token_merging must be a finite"),
        ({"num_inference_steps": 1001}, InputError, "num_inference_steps must be from 1 to 1000"),
        ({"num_inference_steps": 2.5}, InputError, "num_inference_steps must be an integer"),
        ({"seed": 2**64 - 1, "num_images_per_prompt": 2}, InputError, "seed must be -1 \\(random\\) or from 0 to"),
        ({"height": 100_000, "width": 100_000}, InputError, "pixels per batch is over max_pixels"),
        ({"num_images_per_prompt": 100_000}, InputError, "pixels per batch is over max_pixels"),
        ({"init_image": Image.new("RGB", (4096, 4096)), "height": None, "width": None}, InputError, "4096x4096 x 1 images"),
        ({"prompt": "a \udcff cat"}, InputError, "prompt is not valid UTF-8"),
        ({"negative_prompt": "(x:1" + "0" * 400 + ")"}, InputError, "negative_prompt: the weight of 'x' comes to inf"),
        ({"prompt": "(" * 10_000 + "cat"}, InputError, "prompt: brackets nest more than"),
    ],
)
def test_bad_arguments_raise_one_line_errors_before_any_work(pipe, kwargs, error, message):
    hook = pipe.text_encoder.register_forward_pre_hook(lambda *args: pytest.fail("the text encoder ran"))
    try:  # the text encoder is the reference pipeline's own module, shared by every test
        with pytest.raises(error, match=message) as raised:
            pipe(**{"prompt": "a cat", **SIZE, **kwargs})
    finally:
        hook.remove()
    assert "\n" not in str(raised.value)


def test_max_pixels_bounds_each_call_and_can_be_raised(pipe):
    pipe.configure(max_pixels=64 * 64)
    assert len(pipe("a cat", seed=1, output_type="latent", **{**SIZE, "num_inference_steps": 1}).images) == 1
    with pytest.raises(InputError, match="64x64 x 2 images = 8192 pixels per batch is over max_pixels = 4096"):
        pipe(["a cat", "a dog"], seed=1, **SIZE)
    pipe.configure(max_pixels=2 * 64 * 64)
    assert len(pipe(["a cat", "a dog"], seed=1, output_type="latent", **{**SIZE, "num_inference_steps": 1}).images) == 2


def test_seed_minus_one_draws_a_random_seed_and_reports_it(pipe):
    first = pipe("a cat", seed=-1, num_images_per_prompt=2, output_type="latent", **{**SIZE, "num_inference_steps": 1})
    second = pipe("a cat", seed=-1, output_type="latent", **{**SIZE, "num_inference_steps": 1})
    s = first.seeds[0]
    assert first.seeds == [s, s + 1] and 0 <= s < 2**32 and second.seeds != [s]
    again = pipe("a cat", seed=s, num_images_per_prompt=2, output_type="latent", **{**SIZE, "num_inference_steps": 1})
    assert torch.equal(first.images, again.images)


# --- saving results ---------------------------------------------------------------------------------


def test_result_save_writes_pngs_with_the_settings_that_made_them(pipe, tmp_path):
    from ldm.images import read_parameters

    result = pipe(
        ["a cat", "a dog"], negative_prompt=["blurry", "dark"], seed=7, num_images_per_prompt=2, scheduler="euler-ancestral",
        guidance_scale=5.0, clip_skip=1, **SIZE,
    )
    paths = result.save(tmp_path / "out", extra={"Lora": "style: 0.8"})
    assert [p.name for p in paths] == ["00000-7.png", "00001-8.png", "00002-9.png", "00003-10.png"]
    params = [read_parameters(p) for p in paths]
    assert [(p.prompt, p.negative_prompt, p.seed) for p in params] == [
        ("a cat", "blurry", 7), ("a cat", "blurry", 8), ("a dog", "dark", 9), ("a dog", "dark", 10),
    ]
    assert (params[0].steps, params[0].sampler, params[0].cfg_scale, params[0].width, params[0].height) == (3, "Euler a", 5.0, 64, 64)
    assert (params[0].model, params[0].extra["Clip skip"], params[0].extra["Lora"]) == (pipe.name, "2", "style: 0.8")
    assert params[0].extra["Version"].startswith("ldm ")
    assert np.array_equal(np.asarray(Image.open(paths[2])), np.asarray(result.images[2]))
    assert result.save(tmp_path / "out")[0].name == "00004-7.png"  # never overwrites


def test_result_save_records_img2img_and_refuses_what_it_cannot_describe(pipe, tmp_path):
    from ldm.images import read_parameters

    result = pipe("a cat", init_image=gradient_image(), strength=0.5, seed=3, num_inference_steps=2)
    assert read_parameters(result.save(tmp_path)[0]).extra["Denoising strength"] == "0.5"
    with pytest.raises(InputError, match="generator="):
        pipe("a cat", generator=torch.Generator("cpu").manual_seed(1), **SIZE).save(tmp_path)
    with pytest.raises(InputError, match="output_type='pil'"):
        pipe("a cat", seed=1, output_type="np", **SIZE).save(tmp_path)


def test_eta_with_a_scheduler_object_is_refused(pipe):
    with pytest.raises(InputError, match="eta, timestep_spacing and sigma_schedule configure a scheduler named"):
        pipe("a cat", scheduler=create("ddim", pipe.scheduler_config), eta=0.5, **SIZE)


def test_nan_in_the_vae_is_reported_with_its_cause(pipe):
    with torch.no_grad():
        pipe.vae.post_quant_conv.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match="VAE"):
        pipe("a cat", seed=1, **SIZE)


def test_nan_in_the_unet_is_reported_with_its_cause(pipe):
    with torch.no_grad():
        pipe.unet.conv_out.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteOutputError, match="latents became NaN"):
        pipe("a cat", seed=1, **SIZE)


# --- devices and dtypes -----------------------------------------------------------------------------


class OverflowingVAE(torch.nn.Module):
    """A test double of the VAE decoder whose fp16 decode overflows (or, if ``always``, every decode)."""

    def __init__(self, config, always: bool = False):
        super().__init__()
        self.config = config
        self.always = always
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float16))
        self.calls: list[tuple[torch.dtype, torch.dtype]] = []

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.calls.append((z.dtype, self.weight.dtype))
        value = float("inf") if self.always or z.dtype == torch.float16 else 0.0
        return torch.full((z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8), value, dtype=z.dtype)


def as_if_float16(monkeypatch) -> None:
    """Pipelines report float16, as after .to("cuda", torch.float16) (fp16 is refused on the CPU)."""
    monkeypatch.setattr(Pipeline, "dtype", property(lambda self: torch.float16))


def test_fp16_vae_overflow_is_decoded_again_in_fp32(pipe, monkeypatch):
    vae = OverflowingVAE(pipe.vae.config)
    fp16 = Pipeline(pipe.unet, vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler_config)
    as_if_float16(monkeypatch)
    images = fp16.decode_latents(torch.zeros(1, 4, 8, 8))
    assert torch.equal(images, torch.full((1, 3, 64, 64), 0.5))
    assert vae.calls == [(torch.float16, torch.float16), (torch.float32, torch.float32)]
    assert vae.weight.dtype == torch.float16


def test_overflow_that_upcasting_does_not_fix_is_reported(pipe, monkeypatch):
    vae = OverflowingVAE(pipe.vae.config, always=True)
    fp16 = Pipeline(pipe.unet, vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler_config)
    as_if_float16(monkeypatch)
    with pytest.raises(NonFiniteOutputError, match="VAE decoded NaN/inf from finite latents"):
        fp16.decode_latents(torch.zeros(1, 4, 8, 8))
    assert len(vae.calls) == 2
    with pytest.raises(NonFiniteOutputError, match="U-Net overflowed float16"):
        fp16.decode_latents(torch.full((1, 4, 8, 8), float("nan")))


def test_float16_on_the_cpu_is_refused(pipe):
    with pytest.raises(ConfigError, match="CUDA"):
        pipe.to(dtype=torch.float16)


def test_bfloat16_runs_and_stays_close_to_float32(pipe):
    full = pipe("a cat", seed=1, output_type="pt", **{**SIZE, "num_inference_steps": 2}).images
    pipe.text_encoder = copy.deepcopy(pipe.text_encoder)  # the fixture's own is shared with other tests
    pipe.to(dtype=torch.bfloat16)
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16 and pipe.vae.decoder.conv_out.weight.dtype == torch.bfloat16
    half = pipe("a cat", seed=1, output_type="pt", **{**SIZE, "num_inference_steps": 2}).images
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    # Measured max |half - full| = 0.036 (images in [0, 1]; another seed's image differs by up to 1.0).
    error = (half - full).abs().max()
    assert 1e-3 < error < 0.1


def test_model_offload_runs_each_network_on_the_execution_device_and_parks_the_others(pipe, monkeypatch):
    expected = pipe("a cat", seed=1, output_type="pt", **SIZE).images
    pipe.text_encoder = copy.deepcopy(pipe.text_encoder)  # the fixture's own is shared with other tests
    moved_to = record_moves(pipe, monkeypatch)
    running: list[tuple[str, dict[str, torch.device]]] = []  # (network, where each network was) per forward
    for name, module in {"text encoder": pipe.text_encoder, "unet": pipe.unet, "vae": pipe.vae.decoder}.items():
        module.register_forward_pre_hook(lambda *_, name=name: running.append((name, dict(moved_to))))
    # "cpu:0" runs on the CPU but is a device of its own name, so moves to it are told apart from offloading.
    execution, offload = torch.device("cpu:0"), torch.device("cpu")
    pipe.enable_model_cpu_offload(execution)
    networks = ("text encoder", "unet", "vae")
    assert moved_to == dict.fromkeys(networks, offload)
    got = pipe("a cat", seed=1, output_type="pt", **SIZE).images
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert [name for name, _ in running] == ["text encoder", "unet", "unet", "unet", "vae"]
    for name, where in running:
        assert where == {other: execution if other == name else offload for other in networks}
    assert moved_to == dict.fromkeys(networks, offload)


def record_moves(pipe: Pipeline, monkeypatch) -> dict[str, torch.device]:
    """The device each network (text encoder, U-Net, VAE) was last moved to with ``.to``, kept up to date."""
    moved_to: dict[str, torch.device] = {}
    for name, module in {"text encoder": pipe.text_encoder, "unet": pipe.unet, "vae": pipe.vae}.items():

        def to(*args, name=name, move=module.to, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)):
                moved_to[name] = torch.device(target)
            return move(*args, **kwargs)

        monkeypatch.setattr(module, "to", to)
    return moved_to


@pytest.mark.parametrize("init", [False, True], ids=["txt2img", "img2img"])
def test_one_shot_call_releases_each_network_after_its_stage_and_keeps_the_image(reference, init):
    extra = {"init_image": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1} if init else {}
    expected = ldm_pipeline(reference)("a cat", seed=1, output_type="pt", **SIZE, **extra).images
    pipe = ldm_pipeline(reference)
    pipe.text_encoder = copy.deepcopy(pipe.text_encoder)  # the fixture's own is shared with other tests
    pipe.configure(weights_after_use="release")
    resident: list[tuple[bool, bool, bool]] = []  # (text encoder, U-Net, VAE) still hold weights, per U-Net call

    def loaded(module) -> bool:
        return not next(module.parameters()).is_meta

    pipe.unet.register_forward_pre_hook(lambda *_: resident.append(tuple(map(loaded, (pipe.text_encoder, pipe.unet, pipe.vae)))))
    got = pipe("a cat", seed=1, output_type="pt", **SIZE, **extra).images
    assert torch.equal(got, expected)
    assert resident and set(resident) == {(False, True, True)}
    assert not any(map(loaded, (pipe.text_encoder, pipe.unet, pipe.vae)))
    with pytest.raises(ReleasedWeightsError, match="load it again"):
        pipe("a cat", seed=1, output_type="pt", **SIZE)
    with pytest.raises(ReleasedWeightsError):
        pipe.decode_latents(torch.zeros(1, 4, 8, 8))


# --- LoRA -------------------------------------------------------------------------------------------


def write_lora(pipe: Pipeline, path: Path) -> Path:
    """A kohya-format LoRA file adapting one U-Net attention projection."""
    from safetensors.torch import save_file

    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    weight = pipe.unet.get_submodule(module).weight
    generator = torch.Generator().manual_seed(0)
    key = "lora_unet_" + module.replace(".", "_")
    save_file(
        {
            f"{key}.lora_down.weight": torch.randn(2, weight.shape[1], generator=generator),
            f"{key}.lora_up.weight": torch.randn(weight.shape[0], 2, generator=generator),
            f"{key}.alpha": torch.tensor(2.0),
        },
        str(path),
    )
    return path


def test_load_lora_changes_the_image_fused_or_not(reference, tmp_path):
    path = write_lora(ldm_pipeline(reference), tmp_path / "style.safetensors")
    base = ldm_pipeline(reference)("a cat", seed=1, output_type="pt", **SIZE).images
    adapted = ldm_pipeline(reference)
    adapted.load_lora(path, scale=0.8)
    fused = ldm_pipeline(reference)
    fused.load_lora(path, scale=0.8, fuse=True)
    image = adapted("a cat", seed=1, output_type="pt", **SIZE).images
    assert (image - base).abs().max() > 1e-3
    torch.testing.assert_close(fused("a cat", seed=1, output_type="pt", **SIZE).images, image, rtol=0, atol=1e-4)
