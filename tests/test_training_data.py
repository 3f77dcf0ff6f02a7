"""Training data: folder conventions, every bad-input case, conversions, buckets, augmentations, rank split."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from ldm.errors import ConfigError, InputError
from ldm.training.config import DataConfig
from ldm.training.data import (
    BucketBatches,
    DataWarning,
    ImageCaptionDataset,
    bucket_sizes,
    choose_bucket,
    scan_folder,
)
from ldm.images import to_rgb


def write(folder, name, image, caption="a caption"):
    image.save(folder / name)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption)


def solid(size=(32, 32), colour=(200, 10, 10)):
    return Image.new("RGB", size, colour)


def scan_quietly(folder, config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unexpected DataWarning fails the test
        return scan_folder(folder, config)


def test_txt_captions_and_metadata_jsonl(tmp_path):
    write(tmp_path, "a.png", solid(), "red square")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "b.jpg", solid(colour=(0, 0, 200)), None)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/b.jpg", "text": "blue square"}) + "\n")
    examples = scan_quietly(tmp_path, DataConfig(resolution=32))
    assert {e.path.name: e.caption for e in examples} == {"a.png": "red square", "b.jpg": "blue square"}


def test_invalid_utf8_in_a_caption_file_is_refused_naming_file_and_line(tmp_path):
    write(tmp_path, "a.png", solid(), None)
    (tmp_path / "a.txt").write_bytes(b"a red\nsquare \xff\n")
    with pytest.raises(InputError, match=r"a\.txt line 2 is not valid UTF-8 \(byte 0xff\); save it as UTF-8$"):
        scan_folder(tmp_path, DataConfig(resolution=32))
    (tmp_path / "a.txt").write_text("a red square \u00e9", encoding="utf-8")
    assert scan_quietly(tmp_path, DataConfig(resolution=32))[0].caption == "a red square \u00e9"


def test_invalid_utf8_in_metadata_jsonl_is_refused_naming_the_line(tmp_path):
    write(tmp_path, "a.png", solid(), None)
    write(tmp_path, "b.png", solid(), None)
    rows = [json.dumps({"file_name": "a.png", "text": "fine"}).encode(), b'{"file_name": "b.png", "text": "caf\xe9"}']
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(InputError, match=r"metadata\.jsonl line 2 is not valid UTF-8 \(byte 0xe9\)"):
        scan_folder(tmp_path, DataConfig(resolution=32))


def test_metadata_caption_column_and_bad_line(tmp_path):
    write(tmp_path, "a.png", solid(), None)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "p"}) + "\n")
    assert scan_quietly(tmp_path, DataConfig(resolution=32, caption_column="prompt"))[0].caption == "p"
    with pytest.raises(InputError, match="line 1 needs the keys 'file_name' and 'text'"):
        scan_folder(tmp_path, DataConfig(resolution=32))
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(InputError, match="line 1 is not valid JSON"):
        scan_folder(tmp_path, DataConfig(resolution=32))


def test_empty_folder_and_missing_folder_are_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="holds no images"):
        scan_folder(tmp_path, DataConfig(resolution=32))
    with pytest.raises(InputError, match="is not a folder"):
        scan_folder(tmp_path / "missing", DataConfig(resolution=32))


def test_missing_captions_are_an_error_unless_allowed(tmp_path):
    write(tmp_path, "a.png", solid(), "ok")
    write(tmp_path, "b.png", solid(), None)
    with pytest.raises(InputError, match=r"1 image\(s\) have no caption \(e.g. b.png\).*--allow-empty-captions"):
        scan_folder(tmp_path, DataConfig(resolution=32))
    examples = scan_quietly(tmp_path, DataConfig(resolution=32, allow_empty_captions=True))
    assert sorted(e.caption for e in examples) == ["", "ok"]


@pytest.mark.parametrize("resolution", [500, 0, -8])
def test_resolution_must_be_a_positive_multiple_of_8(resolution):
    with pytest.raises(InputError, match="multiple of 8"):
        DataConfig(resolution=resolution)


def test_unreadable_and_truncated_images_are_skipped_in_one_warning(tmp_path):
    write(tmp_path, "good.png", solid())
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    (tmp_path / "garbage.txt").write_text("x")
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    full.unlink()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "truncated.txt").write_text("x")
    with pytest.warns(DataWarning) as caught:
        examples = scan_folder(tmp_path, DataConfig(resolution=32))
    assert [e.path.name for e in examples] == ["good.png"]
    assert len(caught) == 1
    assert "skipped 2 of 3 images: 2 unreadable or truncated" in str(caught[0].message)


def test_no_usable_image_is_an_error(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    (tmp_path / "garbage.txt").write_text("x")
    with pytest.raises(InputError, match="no usable image: 1 unreadable"):
        scan_folder(tmp_path, DataConfig(resolution=32))


def test_small_images_upscaled_or_skipped(tmp_path):
    write(tmp_path, "big.png", solid((64, 64)))
    write(tmp_path, "small.png", solid((16, 16), (10, 200, 10)))
    upscaled = scan_quietly(tmp_path, DataConfig(resolution=32))
    dataset = ImageCaptionDataset(upscaled, DataConfig(resolution=32))
    small = [i for i, e in enumerate(upscaled) if e.path.name == "small.png"][0]
    pixels = dataset[(0, small)]["pixels"]
    assert pixels.shape == (3, 32, 32)
    assert pixels[1].mean() > 0.5 and pixels[0].mean() < -0.5  # still green, now 32x32
    with pytest.warns(DataWarning, match="1 smaller than 32 px"):
        kept = scan_folder(tmp_path, DataConfig(resolution=32, small_images="skip"))
    assert [e.path.name for e in kept] == ["big.png"]
    (tmp_path / "big.png").unlink()
    with pytest.raises(InputError, match="no usable image: 1 smaller than 32 px"):
        scan_folder(tmp_path, DataConfig(resolution=32, small_images="skip"))


def mean_rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(to_rgb(image), dtype=np.float64).reshape(-1, 3).mean(axis=0)


def test_grayscale_palette_cmyk_rgba_and_16_bit_are_converted(tmp_path):
    assert np.allclose(mean_rgb(Image.new("L", (8, 8), 100)), 100)
    palette = Image.new("RGB", (8, 8), (250, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert np.allclose(mean_rgb(palette), (250, 0, 0), atol=2)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    assert np.allclose(mean_rgb(cmyk), (255, 0, 0), atol=2)
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # invisible black → white background
    assert np.allclose(mean_rgb(transparent), 255)
    half = Image.new("RGBA", (8, 8), (0, 0, 255, 128))
    assert np.allclose(mean_rgb(half), (127, 127, 255), atol=2)
    sixteen = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))  # 40000/65535 of full scale
    assert sixteen.mode.startswith("I;16")
    assert np.allclose(mean_rgb(sixteen), 40000 / 257, atol=1)
    # The same images from disk, through the scan and the dataset.
    for name, image in {"l.png": Image.new("L", (32, 32), 100), "p.png": palette.resize((32, 32)),
                        "cmyk.jpg": cmyk.resize((32, 32)), "rgba.png": half.resize((32, 32)),
                        "i16.png": sixteen.resize((32, 32))}.items():
        write(tmp_path, name, image)
    examples = scan_quietly(tmp_path, DataConfig(resolution=32))
    dataset = ImageCaptionDataset(examples, DataConfig(resolution=32))
    by_name = {e.path.name: dataset[(0, i)]["pixels"] for i, e in enumerate(examples)}
    assert len(by_name) == 5
    assert all(p.shape == (3, 32, 32) and p.min() >= -1 and p.max() <= 1 for p in by_name.values())
    assert abs(float(by_name["i16.png"].mean()) - (40000 / 257 / 127.5 - 1)) < 0.02


def test_buckets_keep_non_square_images_whole(tmp_path):
    sizes = bucket_sizes(512)
    assert (512, 512) in sizes
    assert all(w % 8 == 0 and h % 8 == 0 and 0.5 <= w / h <= 2 for w, h in sizes)
    assert all(abs(w * h - 512 * 512) / (512 * 512) < 0.15 for w, h in sizes)
    assert choose_bucket((1024, 512), sizes)[0] > choose_bucket((1024, 512), sizes)[1]
    # A wide image: left half red, right half blue. Square cropping loses most of both halves.
    wide = Image.new("RGB", (96, 48), (255, 0, 0))
    wide.paste(Image.new("RGB", (48, 48), (0, 0, 255)), (48, 0))
    write(tmp_path, "wide.png", wide)
    bucketed = scan_quietly(tmp_path, DataConfig(resolution=32))
    assert bucketed[0].bucket[0] > bucketed[0].bucket[1]
    pixels = ImageCaptionDataset(bucketed, DataConfig(resolution=32))[(0, 0)]["pixels"]
    assert pixels.shape[1] < pixels.shape[2]
    assert pixels[0, :, :4].mean() > 0.9 and pixels[2, :, -4:].mean() > 0.9  # both ends are kept
    square = scan_quietly(tmp_path, DataConfig(resolution=32, buckets=False))
    assert square[0].bucket == (32, 32)


def test_center_and_random_crop_and_flip_are_seeded(tmp_path):
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (32, 1, 3))
    write(tmp_path, "g.png", Image.fromarray(gradient))
    centre = DataConfig(resolution=32, buckets=False)
    examples = scan_quietly(tmp_path, centre)
    middle = ImageCaptionDataset(examples, centre)[(0, 0)]["pixels"]
    assert abs(float(middle.mean())) < 0.05  # the middle of a 0..255 ramp
    random = DataConfig(resolution=32, buckets=False, crop="random", random_flip=True)
    dataset = ImageCaptionDataset(examples, random, seed=3)
    items = [dataset[(epoch, 0)] for epoch in range(12)]
    means = {round(float(item["pixels"].mean()), 3) for item in items}
    assert len(means) > 3  # the crop moves between epochs
    assert {item["flipped"] for item in items} == {True, False}
    again = ImageCaptionDataset(examples, random, seed=3)[(5, 0)]
    assert again["flipped"] == items[5]["flipped"] and (again["pixels"] == items[5]["pixels"]).all()
    flipped = next(item for item in items if item["flipped"])
    assert flipped["pixels"][0, 0, 0] > flipped["pixels"][0, 0, -1]  # the ramp runs right to left


def test_caption_dropout_rate_and_determinism(tmp_path):
    write(tmp_path, "a.png", solid(), "a red square")
    config = DataConfig(resolution=32, caption_dropout=0.3)
    dataset = ImageCaptionDataset(scan_quietly(tmp_path, config), config, seed=1)
    captions = [dataset[(epoch, 0)]["caption"] for epoch in range(400)]
    dropped = captions.count("") / len(captions)
    assert 0.22 < dropped < 0.38
    assert set(captions) == {"", "a red square"}
    assert captions == [dataset[(epoch, 0)]["caption"] for epoch in range(400)]
    with pytest.raises(InputError, match="caption_dropout"):
        DataConfig(caption_dropout=1.5)


def test_batches_share_a_bucket_and_split_between_ranks(tmp_path):
    for i in range(5):
        write(tmp_path, f"sq{i}.png", solid((32, 32)))
    for i in range(4):
        write(tmp_path, f"wide{i}.png", solid((64, 32)))
    examples = scan_quietly(tmp_path, DataConfig(resolution=32))
    ranks = [BucketBatches(examples, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    epochs = [ranks[r].epoch(0) for r in range(2)]
    assert len(epochs[0]) == len(epochs[1]) == len(ranks[0])  # same step count on every rank (DDP)
    for batch in epochs[0] + epochs[1]:
        assert len({examples[index].bucket for _, index in batch}) == 1
    seen = [{index for batch in epoch for _, index in batch} for epoch in epochs]
    assert seen[0] | seen[1] == set(range(9))
    assert len(seen[0] & seen[1]) <= 2  # only the padding batch may repeat
    single = BucketBatches(examples, 2, seed=0).epoch(0)
    assert sorted(i for b in single for _, i in b) == list(range(9))
    assert BucketBatches(examples, 2, seed=0).epoch(1) != single  # reshuffled every epoch
    assert BucketBatches(examples, 2, seed=0).epoch(0, start=2) == single[2:]


def test_images_resized_by_more_than_2x_are_counted_in_one_warning(tmp_path):
    write(tmp_path, "big.png", solid((128, 128)))
    write(tmp_path, "fine.png", solid((64, 64)))
    with pytest.warns(DataWarning) as caught:
        scan_folder(tmp_path, DataConfig(resolution=32))
    assert [str(w.message) for w in caught] == [
        "1 of 2 images are resized by more than 2x to train at 32 px (e.g. big.png: 128x128 shrunk 4x); "
        "if that is not intended, set --resolution"
    ]
    with pytest.raises(ConfigError, match="resolution is None"):
        scan_folder(tmp_path, DataConfig(resolution=None))
