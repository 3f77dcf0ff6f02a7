"""Each pipeline call builds its own sampler; the schedule choices (spacing, Karras sigmas) of a call.

Image parity of every sampler with diffusers is in test_pipeline_parity.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from tiny_models import diffusers_pipeline, ldm_pipeline, save_diffusers_folder

from ldm.cli import main
from ldm.errors import InputError
from ldm.pipeline.stages import build_scheduler
from ldm.settings import GenerationSettings
from ldm.images import read_parameters
from ldm.schedulers import create

SIZE = dict(height=64, width=64, num_inference_steps=4, output_type="pt")


@pytest.fixture(scope="module")
def pipe():
    return ldm_pipeline(diffusers_pipeline("sd1"))


@pytest.mark.parametrize("scheduler", [None, "unipc", "template"])
def test_a_call_made_from_inside_another_calls_callback_changes_neither(pipe, scheduler):
    """A shared sampler would be reset by the inner call and derail the outer one."""
    if scheduler == "template":
        scheduler = create("dpm-solver++", pipe.scheduler_config)
    alone = pipe("a red circle", seed=3, scheduler=scheduler, **SIZE).images
    inner_alone = pipe("a blue square", seed=4, scheduler=scheduler, **SIZE).images
    inner = []

    def call_again(i, t, x, x0):
        if i == 1:
            inner.append(pipe("a blue square", seed=4, scheduler=scheduler, **SIZE).images)

    outer = pipe("a red circle", seed=3, scheduler=scheduler, callback=call_again, **SIZE).images
    torch.testing.assert_close(outer, alone, rtol=0, atol=0)
    torch.testing.assert_close(inner[0], inner_alone, rtol=0, atol=0)


def test_calls_in_two_threads_give_the_images_of_calls_one_after_another(pipe):
    expected = {seed: pipe("a green ring", seed=seed, **SIZE).images for seed in (7, 8)}
    got: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda s=seed: got.update({s: pipe("a green ring", seed=s, **SIZE).images})) for seed in (7, 8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in (7, 8):
        torch.testing.assert_close(got[seed], expected[seed], rtol=0, atol=0)


def test_spacing_and_karras_of_a_call_reach_its_sampler(pipe):
    seen = {}

    def sampler_of(**options):
        settings = GenerationSettings("", scheduler="euler", timestep_spacing=options.get("spacing"), sigma_schedule="karras" if options.get("karras") else "spaced")
        sampler = build_scheduler(pipe.scheduler_config, settings, None)
        sampler.set_timesteps(10)
        return sampler

    assert float(sampler_of().timesteps[0]) == 999  # euler's own (linspace) for a config that leaves it out
    seen["leading"] = float(sampler_of(spacing="leading").timesteps[0])
    seen["trailing"] = float(sampler_of(spacing="trailing").timesteps[0])
    assert seen == {"leading": 901.0, "trailing": 999.0}
    karras = sampler_of(karras=True)
    assert karras.options.use_karras_sigmas and not torch.equal(karras.sigmas, sampler_of().sigmas)
    plain = pipe("a cat", seed=1, scheduler="euler", **SIZE).images
    assert (pipe("a cat", seed=1, scheduler="euler", use_karras_sigmas=True, **SIZE).images - plain).abs().max() > 1e-3
    assert (pipe("a cat", seed=1, scheduler="euler", timestep_spacing="trailing", **SIZE).images - plain).abs().max() > 1e-3


def test_schedule_choices_need_a_named_scheduler(pipe):
    with pytest.raises(InputError, match="use_karras_sigmas does not apply to scheduler ddim"):
        pipe("a cat", scheduler="ddim", use_karras_sigmas=True, **SIZE)
    with pytest.raises(InputError, match="scheduler named by its string"):
        pipe("a cat", scheduler=create("ddim"), timestep_spacing="trailing", **SIZE)
    with pytest.raises(InputError, match="timestep_spacing does not apply to scheduler lcm"):
        pipe("a cat", scheduler="lcm", timestep_spacing="trailing", **SIZE)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny-sd1", "sd1")


def test_cli_takes_spacing_and_karras_and_writes_them_as_a1111_does(model, tmp_path, capsys):
    argv = ["txt2img", "a cat", "--model", str(model), "--steps", "2", "--width", "64", "--height", "64", "--quiet"]
    assert main([*argv, "--scheduler", "euler", "--karras", "--timestep-spacing", "trailing", "--out", str(tmp_path)]) == 0
    path = Path(capsys.readouterr().out.strip())
    params = read_parameters(path)
    assert params.sampler == "Euler"
    assert (params.extra["Schedule type"], params.extra["Timestep spacing"]) == ("Karras", "trailing")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scheduler", "ddim", "--karras"], "--karras does not apply to --scheduler ddim; it applies to dpm-solver,"),
        (["--scheduler", "euler", "--eta", "0.5"], "--eta does not apply to --scheduler euler; it applies to ddim\n"),
        (["--scheduler", "lcm", "--karras"], "--karras does not apply to --scheduler lcm"),
    ],
)
def test_cli_refuses_schedule_options_the_scheduler_does_not_take(extra, message, tmp_path, capsys):
    assert main(["txt2img", "a cat", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_an_unknown_spacing(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["txt2img", "a cat", "--timestep-spacing", "sideways"])
    assert stop.value.code == 2 and "invalid choice: 'sideways'" in capsys.readouterr().err


def test_steps_past_leading_spacing_point_to_a_flag_that_exists(model, tmp_path, capsys):
    argv = ["txt2img", "a cat", "--model", str(model), "--width", "64", "--height", "64", "--quiet", "--out", str(tmp_path)]
    assert main([*argv, "--scheduler", "ddim", "--steps", "1000", "--timestep-spacing", "leading"]) == 2
    assert "--timestep-spacing trailing" in capsys.readouterr().err
