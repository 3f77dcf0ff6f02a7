"""PNG parameters (A1111 format) round trip, numbered atomic output, image conversion."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import InputError
from ldm.images import (
    GenerationParameters,
    check_output_folder,
    format_parameters,
    image_to_tensor,
    open_image,
    parse_parameters,
    read_image,
    read_parameters,
    save_png,
    to_pil,
)


def params(**changes) -> GenerationParameters:
    base = dict(
        prompt="a photo of a (cat:1.2)",
        negative_prompt="blurry",
        steps=25,
        sampler="DPM++ 2M",
        cfg_scale=7.5,
        seed=42,
        width=512,
        height=768,
        model="ldm-shapes",
    )
    return GenerationParameters(**{**base, **changes})


def test_format_is_a1111_layout():
    text = format_parameters(params())
    assert text == (
        "a photo of a (cat:1.2)\n"
        "Negative prompt: blurry\n"
        "Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: ldm-shapes"
    )


def test_empty_negative_prompt_line_is_left_out():
    assert "Negative prompt" not in format_parameters(params(negative_prompt=""))


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"negative_prompt": ""},
        {"prompt": "line one\nline two: with, commas", "negative_prompt": "bad\nworse"},
        {"model": "my, model: v2", "cfg_scale": 7.0},
        {"extra": {"Denoising strength": "0.75", "Clip skip": "2", "Version": "ldm 0.1.0"}},
        {"extra": {"Note": 'quotes " and, commas'}},
        {"prompt": ""},
    ],
)
def test_parameters_round_trip(changes):
    original = params(**changes)
    assert parse_parameters(format_parameters(original)) == original


def test_parses_a1111_and_sdcpp_text():
    a1111 = (
        "masterpiece, (best quality:1.2)\nNegative prompt: lowres\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x512, "
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "x: 1234, y: 5678", Version: v1.10.1'
    )
    parsed = parse_parameters(a1111)
    assert (parsed.prompt, parsed.negative_prompt, parsed.sampler, parsed.seed) == (
        "masterpiece, (best quality:1.2)", "lowres", "Euler a", 1234,
    )
    assert parsed.extra["Lora hashes"] == "x: 1234, y: 5678"
    assert parsed.extra["Model hash"] == "6ce0161689"
    sdcpp = (
        "a lovely cat\nSteps: 20, CFG scale: 7, Guidance: 3.5, Eta: 0, Seed: 42, Size: 512x512, "
        "Model: sd-v1-4, RNG: cuda, Sampler: euler_a, Version: stable-diffusion.cpp"
    )
    parsed = parse_parameters(sdcpp)
    assert (parsed.prompt, parsed.negative_prompt, parsed.steps, parsed.cfg_scale) == ("a lovely cat", "", 20, 7.0)
    assert (parsed.width, parsed.height, parsed.model, parsed.extra["RNG"]) == (512, 512, "sd-v1-4", "cuda")


def test_text_without_settings_is_rejected():
    with pytest.raises(InputError):
        parse_parameters("just a caption")


def test_save_png_numbers_files_and_never_overwrites(tmp_path):
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    first = save_png(image, tmp_path, params(seed=7))
    second = save_png(image, tmp_path, params(seed=7))
    (tmp_path / "00041-other.png").write_bytes(b"not touched")
    third = save_png(image, tmp_path, params(seed=9))
    assert [p.name for p in (first, second, third)] == ["00000-7.png", "00001-7.png", "00042-9.png"]
    assert (tmp_path / "00041-other.png").read_bytes() == b"not touched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-7.png", "00001-7.png", "00041-other.png", "00042-9.png"]
    assert read_parameters(third) == params(seed=9)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(image))


def test_read_parameters_of_a_plain_png_fails(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(InputError, match="no 'parameters'"):
        read_parameters(path)


def test_open_image_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_image(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"definitely not an image")
    with pytest.raises(InputError, match="cannot read image"):
        open_image(broken)


def test_image_to_tensor_range_and_resize():
    image = Image.fromarray(np.array([[[0, 255, 51]] * 16] * 8, dtype=np.uint8))
    tensor = image_to_tensor(image, 16, 8)
    assert tensor.shape == (1, 3, 8, 16)
    torch.testing.assert_close(tensor[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))
    assert image_to_tensor(image, 32, 16).shape == (1, 3, 16, 32)


def test_to_pil_rounds_to_nearest_level():
    images = torch.tensor([0.0, 0.5, 1.0, 0.2]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    array = np.asarray(to_pil(images)[0])
    assert array[..., 0].tolist() == [[0, 128], [255, 51]]


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC over type and fields
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("side", [10_000, 20_000])  # over PIL's limit (a warning), over twice the limit (its error)
def test_decompression_bombs_are_refused_before_decoding(tmp_path, side):
    bomb = png_claiming_size(tmp_path / "bomb.png", side, side)
    with pytest.raises(InputError, match="too many to decode safely; scale it down first"):
        read_image(bomb)


def test_read_image_scales_16_bit_greyscale_instead_of_clipping_it(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    array = np.asarray(read_image(path))
    assert array.shape == (8, 8, 3) and np.all(array == 128)  # 32768 / 257 = 127.5; PIL's convert gives 255


def test_read_image_applies_the_exif_orientation(tmp_path):
    path = tmp_path / "sideways.jpg"
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :16] = 255  # white left half, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = read_image(path)
    assert image.size == (16, 32)
    array = np.asarray(image, dtype=int)
    assert array[:16].mean() > 200 and array[16:].mean() < 50  # the white half is now on top


def test_training_reads_images_with_the_same_function():
    from ldm.images import open_image, read_image
    from ldm.training import data

    assert (data.open_image, data.read_image) == (open_image, read_image)


def test_check_output_folder_refuses_files_on_the_way(tmp_path):
    file = tmp_path / "taken"
    file.write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_output_folder(file, "--out")
    with pytest.raises(InputError, match=f"{file} is a file, not a folder"):
        check_output_folder(file / "deeper" / "out", "--out")
    check_output_folder(tmp_path / "new" / "folder")  # made later, on the first save
    assert not (tmp_path / "new").exists()
