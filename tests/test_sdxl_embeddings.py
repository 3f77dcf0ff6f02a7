"""SDXL textual-inversion embeddings: each file's clip_l vectors on CLIP ViT-L and clip_g vectors on bigG, as diffusers'
``load_textual_inversion`` called once per text encoder with the same token (images within 1e-4, fp32, tiny random
models of tests/tiny_sdxl.py); the refiner's bigG takes the clip_g vectors; "TI hashes"; SD 1.x files skipped."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tiny_sdxl
import torch
from safetensors.torch import save_file
from test_training_support import one_torch_thread  # noqa: F401 - an autouse fixture: one torch thread per module

from ldm.adapters.embeddings import WidthError
from ldm.errors import SettingError
from ldm.pipeline import Pipeline

TOLERANCE = 1e-4
SIZE = dict(height=32, width=32)
NAME = "sdxlstyle"
CALL = dict(prompt=f"a photo of a {NAME} cat", negative_prompt="blurry", guidance_scale=7.0, num_inference_steps=4)


def random(count: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny base and refiner folders, and an SDXL embedding of 2 vectors (A1111 / civitai layout)."""
    root = tmp_path_factory.mktemp("sdxl-emb")
    folders = {kind: tiny_sdxl.save_folder(root / kind, kind) for kind in ("base", "refiner")}
    vectors = {"clip_l": random(2, tiny_sdxl.CLIP_L_WIDTH, 1), "clip_g": random(2, tiny_sdxl.BIGG_WIDTH, 2)}
    (root / "embeddings").mkdir()
    path = root / "embeddings" / f"{NAME}.safetensors"
    save_file(vectors, path)
    return folders, path, vectors


def reference(folder, kind: str, vectors: dict):
    """diffusers' pipeline with the embedding loaded on each of its text encoders, one call per encoder (its docs' recipe)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    pipe = (StableDiffusionXLPipeline if kind == "base" else StableDiffusionXLImg2ImgPipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if pipe.text_encoder is not None:
        pipe.load_textual_inversion(vectors["clip_l"], token=NAME, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["clip_g"], token=NAME, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    return pipe


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_an_sdxl_embedding_on_both_encoders_matches_diffusers(models):
    folders, path, vectors = models
    pipe = Pipeline.from_pretrained(folders["base"])
    assert pipe.load_embeddings(path.parent) == [NAME]
    by_encoder = pipe.embeddings.by_encoder
    assert by_encoder["clip_l"].loaded[NAME] is by_encoder["clip_g"].loaded[NAME]  # the file read once
    theirs = reference(folders["base"], "base", vectors)(**CALL, **SIZE, output_type="np", generator=[generator(5)]).images
    ours = pipe(**CALL, **SIZE, scheduler="euler", output_type="np", seed=5)
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    assert ours.parameters[0].extra["TI hashes"] == f"{NAME}: {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    plain = pipe(**{**CALL, "prompt": "a photo of a cat"}, **SIZE, scheduler="euler", output_type="latent", seed=5)
    assert "TI hashes" not in plain.settings.infotext_extra()
    second = pipe(**{**CALL, "prompt": "a photo of a cat"}, prompt_2=CALL["prompt"], **SIZE, scheduler="euler", output_type="latent", seed=5)
    assert NAME in second.settings.infotext_extra()["TI hashes"]  # named in prompt_2 alone (bigG's text)


def test_the_refiner_takes_the_clip_g_vectors_as_diffusers_ensemble_of_experts(models):
    folders, path, vectors = models
    pipe, refiner = Pipeline.from_pretrained(folders["base"]), Pipeline.from_pretrained(folders["refiner"])
    pipe.load_embeddings(path)
    generators = [generator(11)]
    latents = reference(folders["base"], "base", vectors)(**CALL, **SIZE, denoising_end=0.6, output_type="latent", generator=generators).images
    theirs = reference(folders["refiner"], "refiner", vectors)(
        **CALL, image=latents, denoising_start=0.6, output_type="np", generator=generators
    ).images  # fmt: skip
    ours = pipe(**CALL, **SIZE, scheduler="euler", refiner=refiner, refiner_switch=0.6, output_type="np", seed=11)
    assert list(refiner.embeddings.by_encoder) == ["clip_g"] and NAME in refiner.embeddings.loaded
    assert np.abs(ours.images - theirs).max() < TOLERANCE


def test_an_sd1_embedding_on_sdxl_is_skipped_with_the_reason(models, tmp_path):
    folders, path, vectors = models
    sd1 = tmp_path / "oldstyle.safetensors"  # as wide as the tiny CLIP ViT-L, but an SD 1.x file (one set of vectors)
    save_file({"emb_params": random(1, tiny_sdxl.CLIP_L_WIDTH, 3)}, sd1)
    narrow = tmp_path / "narrowg.safetensors"  # an SDXL file whose clip_g vectors are not bigG's width
    save_file({"clip_l": vectors["clip_l"], "clip_g": random(2, tiny_sdxl.BIGG_WIDTH // 2, 4)}, narrow)
    save_file({"clip_l": vectors["clip_l"], "clip_g": vectors["clip_g"]}, tmp_path / f"{NAME}.safetensors")
    pipe = Pipeline.from_pretrained(folders["base"])
    with pytest.raises(WidthError, match="SD 1.x/2.x"):
        pipe.load_embeddings(sd1)
    with pytest.warns(UserWarning, match="embedding skipped"):
        assert pipe.load_embeddings(tmp_path) == [NAME]
    assert set(pipe.embeddings.skipped) == {"oldstyle", "narrowg"} and "clip_g" in pipe.embeddings.skipped["narrowg"].reason
    assert all(NAME in e.loaded and "narrowg" not in e.loaded for e in pipe.embeddings.by_encoder.values())  # none half-loaded
    with pytest.raises(SettingError, match="oldstyle.*SD 1.x/2.x"):
        pipe("a photo of oldstyle", **SIZE, num_inference_steps=1)
    with pytest.raises(SettingError, match="oldstyle.*SD 1.x/2.x"):
        pipe("a photo", prompt_2="a photo of oldstyle", **SIZE, num_inference_steps=1)


def test_the_refiner_mirrors_its_base_s_embeddings_exactly(models, tmp_path):
    """A refiner shared by two bases (or a base whose set changed) holds exactly the calling base's embeddings: one
    the other base loaded does not linger on its bigG, so a prompt naming it reads plain words there, as on a fresh refiner."""
    folders, path, vectors = models
    other = tmp_path / "otherstyle.safetensors"
    save_file({"clip_l": random(1, tiny_sdxl.CLIP_L_WIDTH, 5), "clip_g": random(1, tiny_sdxl.BIGG_WIDTH, 6)}, other)
    refiner = Pipeline.from_pretrained(folders["refiner"])
    vocabulary = refiner.text_encoder_2.get_input_embeddings().num_embeddings
    first, second, bare = (Pipeline.from_pretrained(folders["base"]) for _ in range(3))
    first.load_embeddings(path)
    second.load_embeddings(other)
    call = dict(CALL, prompt=f"a photo of a {NAME} otherstyle cat", **SIZE, scheduler="euler", refiner_switch=0.5, output_type="np", seed=3)
    first(**call, refiner=refiner)
    assert list(refiner.embeddings.loaded) == [NAME]
    shared = second(**call, refiner=refiner).images
    assert list(refiner.embeddings.loaded) == ["otherstyle"]
    assert refiner.text_encoder_2.get_input_embeddings().num_embeddings == vocabulary + 1
    fresh = second(**call, refiner=Pipeline.from_pretrained(folders["refiner"])).images
    assert np.array_equal(shared, fresh)
    bare(**call, refiner=refiner)
    assert not refiner.embeddings.loaded and refiner.text_encoder_2.get_input_embeddings().num_embeddings == vocabulary
