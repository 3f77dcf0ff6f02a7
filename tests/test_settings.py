"""GenerationSettings and ResolvedSettings: one object checks a call's choices, one records what made the images."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import get_args

import pytest
import torch
from PIL import Image
from tiny_models import diffusers_pipeline, ldm_pipeline

from ldm.errors import InputError, SettingError
from ldm.images import format_parameters, read_parameters
from ldm.settings import SAMPLER_NAMES, TIMESTEP_SPACINGS, GenerationDefaults, GenerationSettings

SIZE = {"height": 64, "width": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def pipe():
    return ldm_pipeline(diffusers_pipeline("sd1"))


def test_settings_are_frozen_and_hold_one_negative_per_prompt():
    settings = GenerationSettings(prompt="a cat", negative_prompt="blurry")
    assert settings.prompt == ("a cat",) and settings.negative_prompt == ("blurry",)
    assert GenerationSettings(prompt=["a", "b"]).negative_prompt == ("", "")
    assert GenerationSettings(prompt=["a", "b"], negative_prompt=["x", "y"]).negative_prompt == ("x", "y")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"guidance_scale": float("nan")}, "{guidance_scale} must be a finite number, got nan"),
        ({"num_inference_steps": 0}, "{num_inference_steps} must be from 1 to 1000"),
        ({"scheduler": "plms"}, "unknown {scheduler} 'plms'"),
        ({"timestep_spacing": "uniform"}, "{timestep_spacing} must be one of leading, linspace, trailing"),
        ({"strength": 0.5}, "{strength} only applies with {init_image}"),
        ({"seed": -2}, "{seed} must be -1 (random)"),
        ({"width": 100}, "{width} must be a positive multiple of 8"),
        ({"negative_prompt": ["x", "y"]}, "give one {negative_prompt} per prompt"),
        ({"prompt": "(x:1" + "0" * 400 + ")"}, "{prompt}: the weight of 'x' comes to inf"),
        ({"sigma_schedule": "polyexponential"}, "{sigma_schedule} must be one of spaced, karras, exponential"),
        ({"timesteps": [1, 5]}, "{timesteps} must be a descending list of numbers, got [1.0, 5.0]"),
        ({"sigmas": [3.0]}, "{sigmas} must be a descending list"),
        ({"timesteps": [9, float("nan")]}, "{timesteps} must be a finite number"),
        ({"timesteps": [9, 5], "sigmas": [2, 1]}, "give {timesteps} or {sigmas}, not both"),
        ({"timesteps": [9, 5], "num_inference_steps": 3}, "{num_inference_steps} must match the {timesteps} given"),
        ({"sigmas": [3.0, 1.0], "sigma_schedule": "karras"}, "{sigmas} replace the schedule"),
    ],
)
def test_a_bad_setting_is_refused_with_its_field_as_a_placeholder(changes, message):
    with pytest.raises(SettingError) as raised:
        GenerationSettings(**{"prompt": "a cat", **changes})
    assert message in raised.value.template and isinstance(raised.value, InputError)
    field = message[message.index("{") + 1 : message.index("}")]
    assert f"--{field}!" in raised.value.worded(lambda name: f"--{name}!")  # each way in words it its own way


def test_a_prompt_with_braces_is_quoted_as_text_not_as_a_placeholder():
    with pytest.raises(SettingError) as raised:
        GenerationSettings(prompt="{x} (y:1" + "0" * 400 + ")")
    assert str(raised.value).startswith("prompt: ") and "{x}" not in raised.value.fields


def test_the_settings_check_imports_no_torch():
    code = (
        "import sys\n"
        "from ldm.settings import GenerationSettings\n"
        "from ldm.errors import SettingError\n"
        "try:\n"
        "    GenerationSettings(prompt='a', guidance_scale=float('inf'))\n"
        "except SettingError as error:\n"
        "    print(error)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["guidance_scale must be a finite number, got inf", "False"]


def test_names_kept_torch_free_equal_the_schedulers_own():
    from ldm.schedulers import SCHEDULERS
    from ldm.schedulers.noise import TimestepSpacing

    assert set(SAMPLER_NAMES) == set(SCHEDULERS)
    assert set(TIMESTEP_SPACINGS) == set(get_args(TimestepSpacing))


def test_own_points_set_the_step_count():
    defaults = GenerationDefaults()
    assert GenerationSettings(prompt="a", timesteps=[999, 500, 1]).filled(defaults, 64, 8).num_inference_steps == 3
    assert GenerationSettings(prompt="a", sigmas=[14.6, 3.0, 0.0]).filled(defaults, 64, 8).num_inference_steps == 2
    with pytest.raises(SettingError, match="exclude each other"):
        GenerationSettings.sigma_schedule_of(True, True)
    assert GenerationSettings.sigma_schedule_of(False, True) == "exponential"


def test_filled_takes_the_models_defaults_and_size_and_keeps_what_was_given():
    defaults = GenerationDefaults(guidance_scale=3.0, num_inference_steps=12)
    filled = GenerationSettings(prompt="a", width=128).filled(defaults, native_side=64, factor=8)
    assert (filled.num_inference_steps, filled.guidance_scale, filled.width, filled.height) == (12, 3.0, 128, 64)
    assert filled.strength is None
    given = GenerationSettings(prompt="a", num_inference_steps=5, guidance_scale=1.0).filled(defaults, 64, 8)
    assert (given.num_inference_steps, given.guidance_scale) == (5, 1.0)
    image = GenerationSettings(prompt="a", init_image=Image.new("RGB", (100, 75))).filled(defaults, 64, 8)
    assert (image.width, image.height, image.strength) == (96, 72, 0.8)


def test_generate_with_settings_equals_the_keyword_call_and_returns_them_resolved(pipe):
    settings = GenerationSettings(prompt="a cat", seed=5, num_images_per_prompt=2, **SIZE)
    result = pipe.generate(settings, output_type="pt")
    keywords = pipe("a cat", seed=5, num_images_per_prompt=2, output_type="pt", **SIZE)
    assert torch.equal(result.images, keywords.images)
    resolved = result.settings
    assert resolved.seeds == (5, 6) and resolved.settings.seed == 5
    assert resolved.settings.guidance_scale == 7.5 and resolved.sampler == "DPM++ 2M" and resolved.model == "model"


def test_png_metadata_is_written_from_the_resolved_settings(pipe, tmp_path):
    pipe.adapters = [("style", 0.8)]  # as load_lora records them (the fixture's pipe is this module's own)
    try:
        result = pipe(["a cat", "a dog"], negative_prompt=["x", "y"], seed=9, guidance_rescale=0.5, clip_skip=1, **SIZE)
    finally:
        pipe.adapters = []
    paths = result.save(tmp_path)
    read = [read_parameters(path) for path in paths]
    assert read == result.parameters == result.settings.parameters()
    assert [(p.prompt, p.negative_prompt, p.seed) for p in read] == [("a cat", "x", 9), ("a dog", "y", 10)]
    assert read[0].extra["Lora"] == "style: 0.8" and read[0].extra["Guidance rescale"] == "0.5"
    assert read[0].extra["Clip skip"] == "2" and "Model hash" not in read[0].extra  # a model built in memory
    assert "Steps: 2, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 9, Size: 64x64" in format_parameters(read[0])


def test_a_single_file_models_hash_is_in_the_metadata(tmp_path):
    import hashlib

    from tiny_models import save_diffusers_folder

    from ldm.loading import load_components, save_single_file
    from ldm.pipeline import Pipeline

    path = save_single_file(load_components(save_diffusers_folder(tmp_path / "folder")), tmp_path / "tiny.safetensors")
    pipe = Pipeline.from_pretrained(path)
    params = pipe("a cat", seed=1, **SIZE).parameters[0]
    assert params.extra["Model hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert params.model == "tiny"
