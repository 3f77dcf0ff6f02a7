"""Separate VAE files: KL-VAE single files and diffusers folders, TAESD as an AutoencoderTiny folder or
its original standalone files; loaded by ``load_vae``, ``Pipeline.from_pretrained(vae=)``,
``pipe.load_vae`` and ``ldm txt2img --vae``, with the images diffusers makes with the same VAE, and the
one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import diffusers_taesd, save_diffusers_folder, taesd_original_state_dicts

from ldm.cli import main
from ldm.errors import CheckpointError, InputError
from ldm.images import read_parameters
from ldm.loading import find_vae, load_components, load_vae, save_single_file
from ldm.models import TAESD, AutoencoderKL
from ldm.pipeline import Pipeline

TOLERANCE = 1e-4
COMMON = dict(prompt="a photo of a red cat", negative_prompt="blurry, dark", guidance_scale=7.5, output_type="np")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, another model's VAE in every layout, and TAESD in every layout."""
    root = tmp_path_factory.mktemp("vae-files")
    model = save_diffusers_folder(root / "model", "sd1", seed=0)
    other = save_diffusers_folder(root / "other", "sd1", seed=1)
    whole = save_single_file(load_components(other), root / "other.safetensors")
    state = load_file(whole)
    vae_state = {key: value for key, value in state.items() if key.startswith("first_stage_model.")}
    save_file(vae_state, root / "other-vae.safetensors")
    # The form of the released VAE .ckpt files: no prefix, under "state_dict", with training-loss tensors.
    bare = {key.removeprefix("first_stage_model."): value for key, value in vae_state.items()}
    torch.save({"state_dict": {**bare, "loss.logvar": torch.zeros(())}}, root / "other-vae.ckpt")

    taesd = diffusers_taesd(seed=3)
    taesd.save_pretrained(root / "taesd")
    originals = taesd_original_state_dicts(taesd)
    (root / "taesd-pth").mkdir()
    (root / "taesd-st").mkdir()
    for part, weights in originals.items():
        torch.save(weights, root / "taesd-pth" / f"taesd_{part}.pth")
        save_file(weights, root / "taesd-st" / f"taesd_{part}.safetensors")
    wide = diffusers_taesd(seed=4, latent_channels=16)
    wide.save_pretrained(root / "taesd-16")
    return {
        "model": model, "other": other, "whole": whole, "kl-safetensors": root / "other-vae.safetensors",
        "kl-ckpt": root / "other-vae.ckpt", "taesd": root / "taesd", "taesd-pth": root / "taesd-pth",
        "taesd-st": root / "taesd-st", "taesd-16": root / "taesd-16", "root": root,
    }  # fmt: skip


def _same_weights(ours: torch.nn.Module, reference: torch.nn.Module) -> bool:
    theirs = reference.state_dict()
    return ours.state_dict().keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())


def test_a_kl_vae_single_file_loads_the_weights_of_its_diffusers_folder(files):
    from diffusers import AutoencoderKL as DiffusersKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    reference = DiffusersKL.from_pretrained(files["other"] / "vae")
    # The file is in the original layout: diffusers' own converter maps it to diffusers' tensors.
    converted = convert_ldm_vae_checkpoint(load_file(files["kl-safetensors"]), dict(reference.config))
    assert all(torch.equal(converted[k].reshape(v.shape), v) for k, v in reference.state_dict().items())
    for name in ("kl-safetensors", "kl-ckpt"):
        vae = load_vae(files[name])
        assert isinstance(vae, AutoencoderKL) and _same_weights(vae, reference), name
        assert find_vae(files[name]).kind == "kl-file"
    folder_vae = load_vae(files["other"] / "vae", dtype="bf16")
    assert find_vae(files["other"] / "vae").kind == "folder" and folder_vae.encoder.conv_in.weight.dtype == torch.bfloat16


def test_taesd_loads_from_its_folder_and_from_its_original_files(files):
    from diffusers import AutoencoderTiny

    reference = AutoencoderTiny.from_pretrained(files["taesd"])
    given = [
        files["taesd"], files["taesd-pth"], files["taesd-st"],
        files["taesd-pth"] / "taesd_encoder.pth", files["taesd-st"] / "taesd_decoder.safetensors",
    ]  # fmt: skip
    for path in given:
        vae = load_vae(path)
        assert isinstance(vae, TAESD) and _same_weights(vae, reference), path
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        latents = reference.encode(image).latents
        assert (vae.encode(image).latents - latents).abs().max() < TOLERANCE
        assert (vae.decode(latents) - reference.decode(latents).sample).abs().max() < TOLERANCE


def test_the_original_taesd_files_are_the_original_sequences(files):
    """The standalone files' naming, checked against TAESD's own modules (madebyollin/taesd's taesd.py)."""
    from torch import nn

    class Clamp(nn.Module):
        def forward(self, x):
            return torch.tanh(x / 3) * 3

    class Block(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(n, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1))
            self.skip, self.fuse = nn.Identity(), nn.ReLU()

        def forward(self, x):
            return self.fuse(self.conv(x) + self.skip(x))

    def conv(n_in, n_out, **kwargs):
        return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)

    # TAESD's Encoder() and Decoder() at width 16 with one block per level.
    level_down = [lambda: conv(16, 16, stride=2, bias=False), lambda: Block(16)]
    level_up = [lambda: Block(16), lambda: nn.Upsample(scale_factor=2), lambda: conv(16, 16, bias=False)]
    encoder = nn.Sequential(conv(3, 16), Block(16), *[make() for _ in range(3) for make in level_down], conv(16, 4))
    decoder = nn.Sequential(Clamp(), conv(4, 16), nn.ReLU(), *[make() for _ in range(3) for make in level_up], Block(16), conv(16, 3))
    encoder.load_state_dict(torch.load(files["taesd-pth"] / "taesd_encoder.pth", weights_only=True), strict=True)
    decoder.load_state_dict(load_file(files["taesd-st"] / "taesd_decoder.safetensors"), strict=True)
    ours = load_vae(files["taesd-pth"])
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        latents = encoder(image)  # the original takes [0, 1] and makes [0, 1]
        assert (ours.encode(image * 2 - 1).latents - latents).abs().max() < TOLERANCE
        assert (ours.decode(latents) - (decoder(latents) * 2 - 1)).abs().max() < TOLERANCE


def _diffusers_with(folder: Path, vae, img2img: bool = False):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert isinstance(reference.scheduler, DDIMScheduler)
    kind = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    return kind(**{**reference.components, "vae": vae})


def init_image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    array = np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255)
    return Image.fromarray(array.astype(np.uint8))


def test_txt2img_with_taesd_matches_diffusers(files):
    from diffusers import AutoencoderTiny

    reference = _diffusers_with(files["model"], AutoencoderTiny.from_pretrained(files["taesd"]))
    kwargs = dict(num_inference_steps=4, height=64, width=64)
    theirs = reference(**COMMON, **kwargs, generator=torch.Generator("cpu").manual_seed(11)).images
    pipe = Pipeline.from_pretrained(files["model"], vae=files["taesd-pth"])
    ours = pipe(**COMMON, **kwargs, scheduler="ddim", seed=11)
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    assert ours.images.std() > 1e-3
    assert ours.settings.parameters()[0].extra["VAE"] == "taesd-pth"
    own = Pipeline.from_pretrained(files["model"])(**COMMON, **kwargs, scheduler="ddim", seed=11)
    assert "VAE" not in own.settings.parameters()[0].extra
    assert np.abs(own.images - ours.images).max() > 1e-2  # the VAE was replaced


def test_img2img_through_taesds_encoder_matches_diffusers(files):
    from diffusers import AutoencoderTiny

    reference = _diffusers_with(files["model"], AutoencoderTiny.from_pretrained(files["taesd"]), img2img=True)
    kwargs = dict(strength=0.6, num_inference_steps=6)
    theirs = reference(**COMMON, **kwargs, image=init_image(), generator=torch.Generator("cpu").manual_seed(77)).images
    pipe = Pipeline.from_pretrained(files["model"], vae=files["taesd"])
    ours = pipe(**COMMON, **kwargs, init_image=init_image(), scheduler="ddim", seed=77)
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    # Two images of one call: image 1 is image 0 of a call seeded 78, as for the KL-VAE (no posterior draw).
    pair = pipe(**{**COMMON, "num_images_per_prompt": 2}, **kwargs, init_image=init_image(), scheduler="ddim", seed=77)
    single = pipe(**COMMON, **kwargs, init_image=init_image(), scheduler="ddim", seed=78)
    assert np.abs(pair.images[1] - single.images[0]).max() < 1e-5


def test_a_kl_vae_file_swapped_in_gives_the_images_of_its_folder_and_of_diffusers(files):
    from diffusers import AutoencoderKL as DiffusersKL

    reference = _diffusers_with(files["model"], DiffusersKL.from_pretrained(files["other"] / "vae"))
    kwargs = dict(num_inference_steps=4, height=64, width=64)
    theirs = reference(**COMMON, **kwargs, generator=torch.Generator("cpu").manual_seed(12)).images
    pipe = Pipeline.from_pretrained(files["model"])
    pipe.load_vae(files["kl-ckpt"])
    ours = pipe(**COMMON, **kwargs, scheduler="ddim", seed=12)
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    from_folder = Pipeline.from_pretrained(files["model"], vae=files["other"] / "vae")(**COMMON, **kwargs, scheduler="ddim", seed=12)
    assert np.abs(from_folder.images - ours.images).max() < 1e-6
    assert ours.settings.parameters()[0].extra["VAE"] == "other-vae.ckpt"


def test_a_swapped_vae_keeps_the_pipelines_dtype(files):
    pipe = Pipeline.from_pretrained(files["model"], dtype=torch.bfloat16, vae=files["taesd-st"])
    assert next(pipe.vae.parameters()).dtype == torch.bfloat16
    images = pipe.decode_latents(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_refusals_are_one_line(files, tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_components(files["kl-safetensors"])
    assert "holds only a VAE, not a whole model" in _one_line(error)
    with pytest.raises(CheckpointError) as error:
        Pipeline.from_pretrained(files["taesd"])
    assert "is a VAE, not a whole model" in _one_line(error)
    with pytest.raises(CheckpointError) as error:
        Pipeline.from_pretrained(files["model"], vae=files["whole"])
    assert "is a whole model (it has U-Net weights), not a VAE" in _one_line(error)
    with pytest.raises(CheckpointError) as error:
        load_vae(files["model"])
    assert "whole model folder, not a VAE; pass its vae/ folder" in _one_line(error)
    with pytest.raises(CheckpointError) as error:
        Pipeline.from_pretrained(files["model"]).load_vae(files["taesd-16"])
    assert "makes 16-channel latents but the model's U-Net takes 4" in _one_line(error)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "taesd_encoder.pth").write_bytes((files["taesd-pth"] / "taesd_encoder.pth").read_bytes())
    with pytest.raises(CheckpointError) as error:
        load_vae(lone / "taesd_encoder.pth")
    assert "ldm needs its decoder too" in _one_line(error)
    with pytest.raises(CheckpointError) as error:
        load_vae(tmp_path / "missing.safetensors")
    assert "does not exist" in _one_line(error)


def test_cli_vae_flag(files, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["txt2img", "a cat", "--model", str(files["model"]), "--vae", str(files["taesd-st"]), "--seed", "3",
                 "--steps", "2", "--width", "64", "--height", "64", "--quiet", "--out", str(out)])  # fmt: skip
    assert code == 0
    params = read_parameters(out / "00000-3.png")
    assert params.extra["VAE"] == "taesd-st"
    expected = Pipeline.from_pretrained(files["model"], vae=files["taesd"])("a cat", num_inference_steps=2, height=64, width=64, seed=3)
    assert np.abs(np.asarray(Image.open(out / "00000-3.png"), dtype=int) - np.asarray(expected.images[0], dtype=int)).max() <= 1
    capsys.readouterr()
    for vae, said in ((files["whole"], "whole model"), (tmp_path / "nothing.safetensors", "does not exist")):
        code = main(["txt2img", "a cat", "--model", str(files["model"]), "--vae", str(vae), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and said in err and err.count("\n") == 1


def test_a_taesd_decoder_alone_decodes_as_the_whole_taesd_and_refuses_img2img_in_one_line(files, tmp_path):
    """A1111 ships taesd_decoder.pth alone (for previews): it loads, as a file or as the one file of a folder."""
    from diffusers import AutoencoderTiny

    reference = AutoencoderTiny.from_pretrained(files["taesd"])
    alone = tmp_path / "approx"
    alone.mkdir()
    (alone / "taesd_decoder.pth").write_bytes((files["taesd-pth"] / "taesd_decoder.pth").read_bytes())
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    for path in (alone / "taesd_decoder.pth", alone):
        vae = load_vae(path)
        assert isinstance(vae, TAESD) and vae.encoder is None
        with torch.no_grad():
            assert (vae.decode(latents) - reference.decode(latents).sample).abs().max() < TOLERANCE
    pipe = Pipeline.from_pretrained(files["model"], vae=alone)
    assert pipe("a cat", num_inference_steps=1, seed=0, output_type="pt").images.shape[1] == 3  # txt2img decodes
    with pytest.raises(InputError) as error:
        pipe("a cat", init_image=init_image(), num_inference_steps=2, seed=0)
    assert "loaded from its taesd_decoder file alone, so it cannot encode an image (img2img)" in _one_line(error)

