"""Training data: a folder of images with captions, checked up front, in aspect-ratio buckets.

Conventions (those of diffusers' image-folder datasets):
  * ``photo.png`` + ``photo.txt`` (same stem, any sub-folder): the text file holds the caption;
  * or ``metadata.jsonl`` at the top of the folder, one JSON object per line with ``file_name``
    (relative to the folder) and ``text`` (or the column named by ``DataConfig.caption_column``).

Every image is decoded once by ``scan_folder`` before training starts, so unreadable or truncated
files are found, skipped and reported in one warning instead of crashing a run hours later.

Randomness (crop position, flip, caption dropout) is drawn from a generator seeded with
``(seed, epoch, image index)``: the same sample looks the same whether it is read by the first run,
by a resumed run, by any worker or on any rank.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.errors import ConfigError, InputError
from ldm.images import open_image, read_image  # the one image reader, shared with init images
from ldm.training.config import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataWarning(UserWarning):
    """Some training images were skipped; the message says how many and why."""


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    size: tuple[int, int]  # (width, height) of the source image
    bucket: tuple[int, int]  # (width, height) it is trained at


def read_text(path: Path) -> str:
    """A caption file as text. Invalid UTF-8 is refused, naming the file and line: replacing the bytes
    would train on captions the user never wrote, and guessing another encoding can be silently wrong."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InputError(f"{path} line {line} is not valid UTF-8 (byte 0x{data[error.start]:02x}); save it as UTF-8") from None


def _read_metadata(folder: Path, column: str) -> dict[Path, str]:
    captions: dict[Path, str] = {}
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return captions
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path} line {number} is not valid JSON; write one object per line") from None
        if not isinstance(row, dict) or "file_name" not in row or column not in row:
            raise InputError(f"{path} line {number} needs the keys 'file_name' and '{column}'")
        captions[(folder / row["file_name"]).resolve()] = str(row[column])
    return captions


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(width, height) buckets of about ``resolution**2`` pixels, aspect ratios from 1:2 to 2:1.

    Sides are multiples of ``step`` (64 at SD sizes, as in NovelAI's bucketing; smaller for tiny
    test resolutions), so every bucket stays divisible by the VAE's factor of 8.
    """
    step = max(8, min(64, resolution // 4) // 8 * 8)
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    width = resolution // 2 // step * step or step
    while width <= 2 * resolution:
        height = area // width // step * step
        if height >= step and 0.5 <= width / height <= 2.0:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    return sorted(sizes)


def choose_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space: 2:1 and 1:2 are equally far from 1:1)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def scan_folder(folder: str | Path, config: DataConfig) -> list[Example]:
    """Every usable image under ``folder`` with its caption and bucket; errors before any training.

    Unreadable images and (with ``small_images="skip"``) too-small images are skipped and counted
    in one ``DataWarning``; no usable image at all, or images without captions, are an ``InputError``.
    """
    folder = Path(folder)
    if config.resolution is None:
        raise ConfigError("DataConfig.resolution is None; set the training size (e.g. the model's native size) before scanning")
    if not folder.is_dir():
        raise InputError(f"--data {folder} is not a folder; point it at a folder of images with captions")
    metadata = _read_metadata(folder, config.caption_column)
    paths = image_files(folder)
    if not paths:
        raise InputError(f"--data {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add images with captions")
    scan = scan_images(paths, metadata, config)

    if scan.uncaptioned:
        raise InputError(
            f"{len(scan.uncaptioned)} image(s) have no caption (e.g. {scan.uncaptioned[0].name}); add a same-name .txt file, "
            "a metadata.jsonl, or pass --allow-empty-captions"
        )
    skipped = []
    if scan.unreadable:
        skipped.append(f"{len(scan.unreadable)} unreadable or truncated (e.g. {scan.unreadable[0].name})")
    if scan.too_small:
        skipped.append(f"{len(scan.too_small)} smaller than {config.resolution} px (e.g. {scan.too_small[0].name})")
    if not scan.examples:
        raise InputError(f"--data {folder} has no usable image: {'; '.join(skipped)}; fix or replace the images")
    if skipped:
        count = len(scan.unreadable) + len(scan.too_small)
        warnings.warn(f"skipped {count} of {len(paths)} images: {'; '.join(skipped)}", DataWarning, stacklevel=2)
    warn_far_resizes(scan.examples, config.resolution)
    return scan.examples


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, sorted; hidden files and anything in hidden folders are left out."""
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


@dataclass
class FolderScan:
    """What ``scan_images`` found: the usable examples, and the images it left out by reason."""

    examples: list[Example] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)
    too_small: list[Path] = field(default_factory=list)  # only with small_images="skip"
    uncaptioned: list[Path] = field(default_factory=list)  # only without allow_empty_captions


def scan_images(paths: list[Path], metadata: dict[Path, str], config: DataConfig) -> FolderScan:
    """Decode each image, find its caption and bucket. An unreadable image is never asked for its caption."""
    buckets = bucket_sizes(config.resolution) if config.buckets else [(config.resolution, config.resolution)]
    scan = FolderScan()
    for path in paths:
        size = decoded_size(path)
        if size is None:
            scan.unreadable.append(path)
            continue
        caption = find_caption(path, metadata)
        if caption is None and not config.allow_empty_captions:
            scan.uncaptioned.append(path)
            continue
        bucket = choose_bucket(size, buckets)
        if config.small_images == "skip" and (size[0] < bucket[0] or size[1] < bucket[1]):
            scan.too_small.append(path)
            continue
        scan.examples.append(Example(path, "" if caption is None else caption, size, bucket))
    return scan


def decoded_size(path: Path) -> tuple[int, int] | None:
    """(width, height) after the EXIF rotation, or None if the file does not decode completely."""
    try:
        # Decodes fully, so a truncated file fails here, not in the middle of training; oversized
        # images (decompression bombs) are refused by their header, as init images are.
        with open_image(path) as image:
            return ImageOps.exif_transpose(image).size
    except InputError:
        return None


def find_caption(path: Path, metadata: dict[Path, str]) -> str | None:
    """The image's metadata.jsonl caption, else its same-name .txt file, else None."""
    caption = metadata.get(path.resolve())
    text_file = path.with_suffix(".txt")
    if caption is None and text_file.is_file():
        caption = read_text(text_file).strip()
    return caption


def resize_factor(example: Example) -> float:
    """The scale that makes the image cover its bucket (above 1: enlarged, below 1: shrunk)."""
    return max(example.bucket[0] / example.size[0], example.bucket[1] / example.size[1])


def warn_far_resizes(examples: list[Example], resolution: int) -> None:
    """One ``DataWarning`` when images are scaled by more than 2x: upscaled images train blurry and cost
    far more per step; shrunk ones lose detail. Either often means an unintended training size."""
    far = [e for e in examples if not 0.5 <= resize_factor(e) <= 2.0]
    if not far:
        return
    worst = max(far, key=lambda e: abs(math.log(resize_factor(e))))
    factor = resize_factor(worst)
    how = f"enlarged {factor:.3g}x" if factor > 1 else f"shrunk {1 / factor:.3g}x"
    warnings.warn(
        f"{len(far)} of {len(examples)} images are resized by more than 2x to train at {resolution} px "
        f"(e.g. {worst.path.name}: {worst.size[0]}x{worst.size[1]} {how}); if that is not intended, set --resolution",
        DataWarning,
        stacklevel=3,
    )


@dataclass(frozen=True)
class CropBox:
    """Where a training sample comes from in its source image: the image resized by ``scale`` to ``resized``
    (width, height), covering its bucket, then the bucket-sized box at (``left``, ``top``)."""

    scale: float
    resized: tuple[int, int]
    left: int
    top: int


def crop_of(example: Example, position: float, size: tuple[int, int]) -> CropBox:
    """The crop of ``example`` (whose decoded image has ``size``) at ``position`` in [0, 1] along the overhanging side."""
    width, height = example.bucket
    scale = max(width / size[0], height / size[1])
    resized = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    return CropBox(scale, resized, round((resized[0] - width) * position), round((resized[1] - height) * position))


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentations; independent of reading order, worker and rank."""
    return np.random.default_rng([seed, epoch, index])


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Item ``(epoch, index)``: ``{"pixels": (3, H, W) in [-1, 1], "caption": str, "index": int, "flipped": bool,
    "time_ids": SDXL's six micro-conditioning numbers}``.

    ``seed`` seeds the augmentations; ``with_pixels=False`` leaves out the image (for cached latents).
    """

    def __init__(self, examples: list[Example], config: DataConfig, seed: int = 0, with_pixels: bool = True):
        self.examples = examples
        self.config = config
        self.seed = seed
        self.with_pixels = with_pixels

    def without_pixels(self) -> ImageCaptionDataset:
        return ImageCaptionDataset(self.examples, self.config, self.seed, with_pixels=False)

    def __len__(self) -> int:
        return len(self.examples)

    def augmentation(self, epoch: int, index: int) -> tuple[bool, float, bool]:
        """(flip, crop position in [0, 1], drop caption) of one sample in one epoch."""
        rng = sample_rng(self.seed, epoch, index)
        flip, position, drop = rng.random(3)
        return (
            bool(self.config.random_flip and flip < 0.5),
            float(position) if self.config.crop == "random" else 0.5,
            bool(drop < self.config.caption_dropout),
        )

    def pixels(self, index: int, flip: bool, position: float) -> torch.Tensor:
        """Resize to cover the bucket, crop at ``position`` along the overhanging side, flip; (3, H, W) in [-1, 1]."""
        example = self.examples[index]
        width, height = example.bucket
        image = read_image(example.path)
        crop = crop_of(example, position, image.size)
        image = image.resize(crop.resized, Image.Resampling.LANCZOS if crop.scale < 1 else Image.Resampling.BICUBIC)
        image = image.crop((crop.left, crop.top, crop.left + width, crop.top + height))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def time_ids(self, index: int, flip: bool, position: float) -> tuple[int, int, int, int, int, int]:
        """SDXL's micro-conditioning of the sample (Podell et al. 2023, sec. 2.2): the source image's
        (height, width), the crop's (top, left) in the resized image as trained (a mirrored sample's crop
        measured from the mirrored side), and the trained (height, width). Read from the sizes alone."""
        example = self.examples[index]
        crop = crop_of(example, position, example.size)
        width, height = example.bucket
        left = crop.resized[0] - crop.left - width if flip else crop.left
        return (example.size[1], example.size[0], crop.top, left, height, width)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        flip, position, drop = self.augmentation(epoch, index)
        item = {"caption": "" if drop else self.examples[index].caption, "index": index, "flipped": flip,
                "time_ids": self.time_ids(index, flip, position)}
        if self.with_pixels:
            item["pixels"] = self.pixels(index, flip, position)
        return item


def collate(items: list[dict]) -> dict:
    batch = {
        "caption": [item["caption"] for item in items],
        "index": [item["index"] for item in items],
        "flipped": [item["flipped"] for item in items],
        "time_ids": torch.tensor([item["time_ids"] for item in items], dtype=torch.float32),
    }
    if "pixels" in items[0]:
        batch["pixels"] = torch.stack([item["pixels"] for item in items])
    return batch


class BucketBatches:
    """The batches of one epoch for one rank: same-bucket images, shuffled by ``(seed, epoch)``.

    All ranks compute the same global list and take every ``world_size``-th batch, so the data is
    split between ranks without communication; the list is padded by repetition to a multiple of
    ``world_size`` so every rank makes the same number of steps (as DDP requires).
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, example in enumerate(examples):
            self.by_bucket.setdefault(example.bucket, []).append(index)

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch, 7919])
        batches = []
        for bucket in sorted(self.by_bucket):
            indices = [self.by_bucket[bucket][i] for i in rng.permutation(len(self.by_bucket[bucket]))]
            batches += [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        original = len(batches)
        while len(batches) % self.world_size:
            batches.append(batches[(len(batches) - original) % original])
        return batches

    def __len__(self) -> int:
        return len(self.global_batches(0)) // self.world_size

    def epoch(self, epoch: int, start: int = 0) -> list[list[tuple[int, int]]]:
        """This rank's batches of ``epoch`` from batch ``start`` on, as dataset keys ``(epoch, index)``."""
        mine = self.global_batches(epoch)[self.rank::self.world_size]
        return [[(epoch, index) for index in batch] for batch in mine[start:]]
