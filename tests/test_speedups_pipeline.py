"""The pipeline's speed-up switches: exact when off, fewer passes when on, validated, and not leaking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import diffusers_pipeline, ldm_pipeline

from ldm.errors import InputError
from ldm.pipeline import Pipeline

RUN = dict(height=64, width=64, num_inference_steps=6, seed=3, output_type="pt")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return ldm_pipeline(diffusers_pipeline("sd1"))


@pytest.fixture(scope="module")
def exact(pipe) -> torch.Tensor:
    return pipe("a red circle", **RUN).images


def _record(module: torch.nn.Module) -> tuple[list[int], object]:
    # The output's rows: guided calls pass one latent row for both passes and return two.
    sizes: list[int] = []
    handle = module.register_forward_hook(lambda _, args, out: sizes.append(out.shape[0]))
    return sizes, handle


def max_difference(images: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest pixel difference. Images are in [0, 1]; another seed's image differs from ``exact`` by up
    to 0.87 (mean 0.18), so bounds near half of that would pass an unrelated image."""
    return (images - exact).abs().max().item()


def test_switches_at_their_neutral_values_give_the_exact_image(pipe, exact):
    images = pipe("a red circle", guidance_fraction=1.0, deepcache_interval=1, token_merging=0.0, **RUN).images
    assert torch.equal(images, exact)


def test_guidance_fraction_half_drops_the_unconditional_pass_in_the_second_half(pipe, exact):
    sizes, handle = _record(pipe.unet)
    try:
        images = pipe("a red circle", guidance_fraction=0.5, **RUN).images
    finally:
        handle.remove()
    assert sizes == [2, 2, 2, 1, 1, 1]
    assert 2e-4 < max_difference(images, exact) < 0.0025  # measured 0.0009 (DPM-Solver++ on its linspace grid)
    # With no guided step every pass is the conditional one: the image of guidance_scale 1.
    unguided = pipe("a red circle", guidance_fraction=0.0, **RUN).images
    torch.testing.assert_close(unguided, pipe("a red circle", guidance_scale=1.0, **RUN).images, rtol=0, atol=1e-5)


def test_deepcache_runs_the_deep_part_every_third_step(pipe, exact):
    sizes, handle = _record(pipe.unet.mid_block)
    try:
        images = pipe("a red circle", deepcache_interval=3, **RUN).images
    finally:
        handle.remove()
    assert len(sizes) == 2  # steps 0 and 3 of 6
    assert 0.01 < max_difference(images, exact) < 0.09  # measured 0.046


def test_token_merging_applies_for_the_call_only(pipe, exact):
    images = pipe("a red circle", token_merging=0.5, **RUN).images
    assert 3e-3 < max_difference(images, exact) < 0.04  # measured 0.018
    assert torch.equal(pipe("a red circle", **RUN).images, exact)


@pytest.mark.parametrize(
    "option", [{"guidance_fraction": 1.5}, {"guidance_fraction": -0.1}, {"deepcache_interval": 0}, {"token_merging": 0.9}]
)
def test_out_of_range_speedups_are_input_errors(pipe, option):
    with pytest.raises(InputError):
        pipe("a red circle", **{**RUN, **option})


# --- the command line --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from tiny_models import save_diffusers_folder

    return save_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny-sd1", "sd1")


def test_cli_speedup_flags_change_the_image_and_are_recorded(model_folder, tmp_path, capsys):
    from ldm.cli import main
    from ldm.images import read_parameters

    common = ["txt2img", "a red circle", "--model", str(model_folder), "--seed", "4", "--steps", "6",
              "--width", "64", "--height", "64", "--quiet"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "exact")]) == 0
    fast = ["--deepcache", "3", "--guidance-fraction", "0.5", "--tome", "0.5", "--channels-last"]
    assert main([*common, *fast, "--out", str(tmp_path / "fast")]) == 0
    capsys.readouterr()
    exact, quick = (next((tmp_path / name).iterdir()) for name in ("exact", "fast"))
    assert np.asarray(Image.open(exact)).tolist() != np.asarray(Image.open(quick)).tolist()
    extra = read_parameters(quick).extra
    assert (extra["DeepCache interval"], extra["Guidance fraction"], extra["Token merging ratio"]) == ("3", "0.5", "0.5")
    assert "DeepCache interval" not in read_parameters(exact).extra


@pytest.mark.parametrize(
    "flag, value", [("--deepcache", "0"), ("--guidance-fraction", "1.2"), ("--tome", "0.8"), ("--tome", "-0.1")]
)
def test_cli_rejects_out_of_range_speedups_in_one_line(model_folder, tmp_path, capsys, flag, value):
    from ldm.cli import main

    code = main(["txt2img", "a cat", "--model", str(model_folder), flag, value, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert flag in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
