"""Textual-inversion embeddings: every file layout read, used as diffusers' ``load_textual_inversion`` uses
it (text-encoder output and image within 1e-4), weighted, counted in 75-token chunks, matched only as a
whole word, named in the infotext's "TI hashes"; the errors; ``ldm txt2img --embeddings``."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import clip_tokenizer, diffusers_pipeline, ldm_pipeline, save_diffusers_folder

from ldm.adapters.embeddings import read_embedding
from ldm.cli import main
from ldm.errors import CheckpointError, InputError, SettingError
from ldm.images import format_parameters, read_parameters
from ldm.prompts import CHUNK_TOKENS, apply_weights, encode_prompts, tokenize_prompt

TOLERANCE = 1e-4
WIDTH = 64  # the tiny SD 1.x CLIP's hidden size (tests/tiny_models.py)


def vectors(count: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def write(folder: Path, layout: str, name: str, vecs: torch.Tensor) -> Path:
    """An embedding file in one of the layouts people share."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "a1111-pt":  # what A1111's Embedding.save writes
        path = folder / f"{name}.pt"
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vecs}, "name": name, "step": 1500,
                "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "tiny"}  # fmt: skip
        torch.save(data, path)
    elif layout == "a1111-safetensors":  # kohya / A1111 .safetensors
        path = folder / f"{name}.safetensors"
        save_file({"emb_params": vecs.contiguous()}, path)
    elif layout == "diffusers-safetensors":  # learned_embeds.safetensors: {token: (width,)} for one vector
        path = folder / f"{name}.safetensors"
        save_file({f"<{name}>": (vecs[0] if len(vecs) == 1 else vecs).contiguous()}, path)
    else:  # diffusers learned_embeds.bin
        path = folder / f"{name}.bin"
        torch.save({f"<{name}>": vecs}, path)
    return path


LAYOUTS = ["a1111-pt", "a1111-safetensors", "diffusers-safetensors", "diffusers-bin"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("count", [1, 3])
def test_every_layout_reads_as_its_stem_and_vectors(tmp_path, layout, count):
    vecs = vectors(count, 1)
    embedding = read_embedding(write(tmp_path, layout, "zorblat", vecs))
    assert embedding.name == "zorblat" and torch.equal(embedding.vectors, vecs)
    assert (embedding.count, embedding.width) == (count, WIDTH)
    if layout == "a1111-pt":
        assert (embedding.step, embedding.sd_checkpoint, embedding.sd_checkpoint_name) == (1500, "abcd1234", "tiny")


def text_states(pipe, prompts: list[str]) -> torch.Tensor:
    return encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, words=pipe.prompt_words())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("count", [1, 4])
def test_text_encoder_output_equals_diffusers_load_textual_inversion(tmp_path, layout, count):
    path = write(tmp_path, layout, "zorblat", vectors(count, 2))
    reference = diffusers_pipeline()
    reference.load_textual_inversion(str(path), token="zorblat")
    pipe = ldm_pipeline(diffusers_pipeline())
    assert pipe.load_embeddings(path) == ["zorblat"]
    prompts = ["a zorblat cat", "a photo of zorblat on a mat, zorblat again"]
    theirs = reference.encode_prompt(prompts, "cpu", 1, False)[0]
    ours = text_states(pipe, prompts)
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < TOLERANCE
    without = ldm_pipeline(diffusers_pipeline())
    assert (text_states(without, prompts) - ours).abs().max() > 1e-2  # the vectors were used


def test_image_with_an_embedding_in_prompt_and_negative_equals_diffusers(tmp_path):
    good, bad = write(tmp_path, "a1111-pt", "zorblat", vectors(2, 3)), write(tmp_path, "a1111-safetensors", "smudge", vectors(3, 4))
    reference = diffusers_pipeline()
    reference.load_textual_inversion([str(good), str(bad)], token=["zorblat", "smudge"])
    pipe = ldm_pipeline(diffusers_pipeline())
    assert pipe.load_embeddings(tmp_path) == ["smudge", "zorblat"]
    call = dict(prompt="a zorblat cat", negative_prompt="smudge, dark", guidance_scale=7.5, num_inference_steps=3, height=64, width=64)
    from diffusers import DPMSolverMultistepScheduler

    reference.scheduler = DPMSolverMultistepScheduler.from_config(reference.scheduler.config)
    theirs = reference(**call, generator=torch.Generator("cpu").manual_seed(9), output_type="np").images
    ours = pipe(**call, seed=9, scheduler="dpm-solver++", output_type="np")
    assert np.abs(ours.images - theirs).max() < TOLERANCE
    plain = pipe(**{**call, "negative_prompt": "dark"}, seed=9, scheduler="dpm-solver++", output_type="np")
    assert np.abs(ours.images - plain.images).max() > 1e-3  # the negative's embedding was used


def test_weighting_scales_the_embeddings_vectors(tmp_path):
    pipe = ldm_pipeline(diffusers_pipeline())
    pipe.load_embeddings(write(tmp_path, "a1111-pt", "zorblat", vectors(3, 5)))
    weighted = text_states(pipe, ["a (zorblat:1.2) cat"])
    plain = text_states(pipe, ["a zorblat cat"])
    weights = torch.ones(1, 77)
    weights[0, 2:5] = 1.2  # [start] a zorblat(3 vectors) cat [end]
    assert (weighted - apply_weights(plain, weights)).abs().max() < 1e-5
    assert (weighted - plain).abs().max() > 1e-3


def test_each_vector_counts_as_a_token_and_an_embedding_is_never_split(tmp_path):
    pipe = ldm_pipeline(diffusers_pipeline())
    pipe.load_embeddings(write(tmp_path, "a1111-pt", "long", vectors(70, 6)))
    word = pipe.prompt_words()[0]
    chunks = tokenize_prompt(pipe.tokenizer, "a b c d e long", pipe.prompt_words())
    assert len(chunks.ids) == 1 and chunks.ids[0][6:76] == list(word.ids)  # 5 + 70 = 75: it fits
    chunks = tokenize_prompt(pipe.tokenizer, "a b c d e f long", pipe.prompt_words())
    assert len(chunks.ids) == 2  # 6 + 70 > 75: the whole embedding starts the second chunk
    assert chunks.ids[0][7] == pipe.tokenizer.eos_token_id and chunks.ids[1][1:71] == list(word.ids)
    assert text_states(pipe, ["a b c d e f long"]).shape == (1, 154, WIDTH)
    with pytest.raises(CheckpointError, match=f"has 76 vectors; a prompt chunk holds {CHUNK_TOKENS}"):
        read_embedding(write(tmp_path / "more", "a1111-pt", "toolong", vectors(76, 7)))


def test_only_a_whole_word_matches_in_any_case(tmp_path):
    pipe = ldm_pipeline(diffusers_pipeline())
    pipe.load_embeddings(write(tmp_path, "a1111-pt", "negative", vectors(2, 8)))
    words, ids = pipe.prompt_words(), pipe.prompt_words()[0].ids
    tokenizer = clip_tokenizer()
    # CLIP writes "easynegative" as easy + negative</w>: A1111 would use the embedding inside it; we do not.
    assert tokenize_prompt(tokenizer, "easynegative", words).ids == tokenize_prompt(tokenizer, "easynegative").ids
    assert tokenize_prompt(tokenizer, "negatives", words).ids == tokenize_prompt(tokenizer, "negatives").ids
    for text in ("negative", "NeGaTiVe", "(negative:0.9), x", "x,negative"):
        chunks = tokenize_prompt(tokenizer, text, words)
        assert set(ids) <= set(chunks.ids[0]) and chunks.words == ["negative"], text


def test_files_that_do_not_fit_are_refused_with_a_reason(tmp_path):
    pipe = ldm_pipeline(diffusers_pipeline())
    wide = write(tmp_path, "a1111-pt", "wide", vectors(1, 9, width=768))
    with pytest.raises(CheckpointError, match=rf"^embedding {wide} has vectors of width 768; this model's text encoder takes 64$"):
        pipe.load_embeddings(wide)
    sdxl = tmp_path / "xl.safetensors"
    save_file({"clip_l": vectors(1, 1, 768), "clip_g": vectors(1, 1, 1280)}, sdxl)
    with pytest.raises(CheckpointError, match=r"is for SDXL \(clip_l and clip_g vectors\); this model is SD 1.x/2.x"):
        pipe.load_embeddings(sdxl)
    odd = tmp_path / "odd.safetensors"
    save_file({"a": vectors(1, 1), "b": vectors(1, 1)}, odd)
    with pytest.raises(CheckpointError, match=r"unknown layout \(keys: a, b\)"):
        read_embedding(odd)
    lora = tmp_path / "lora.safetensors"  # a file of another kind: its keys are named, a few of them
    save_file({f"lora_te_{i}.lora_down.weight": torch.zeros(1) for i in range(40)}, lora)
    with pytest.raises(CheckpointError, match=r"unknown layout \(keys: lora_te_0.lora_down.weight, .*, \.\.\. \(40 keys\)\)"):
        read_embedding(lora)
    with pytest.raises(InputError, match="does not exist"):
        pipe.load_embeddings(tmp_path / "missing")
    # In a folder, what does not fit is skipped (listed, with a warning), the rest is loaded.
    write(tmp_path, "a1111-pt", "zorblat", vectors(1, 10))
    with pytest.warns(UserWarning, match="embedding skipped"):
        assert pipe.load_embeddings(tmp_path) == ["zorblat"]
    assert set(pipe.embeddings.skipped) == {"wide", "xl", "odd", "lora"} and pipe.embeddings.skipped["wide"].embedding.width == 768
    # A prompt that writes a skipped file's name is refused with the reason, not encoded as plain words.
    with pytest.raises(SettingError, match=r"uses the embedding 'wide', which was not loaded: .*width 768"):
        pipe("a (wide:1.2) field", num_inference_steps=1, output_type="latent")
    # Two names a prompt writes alike (CLIP lowercases) cannot both be used: the second is refused.
    write(tmp_path / "sub", "a1111-pt", "ZorBlat", vectors(1, 15))
    with pytest.warns(UserWarning, match="a prompt writes its name as it writes 'zorblat'"):
        assert pipe.load_embeddings(tmp_path) == ["zorblat"]


class Payload:
    """Unpickling this would run code of our choosing: weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_pt_files_load_with_weights_only(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Payload()}}, evil)
    with pytest.raises(CheckpointError, match=r"is a pickle that builds a print object; ldm reads only tensors from \.pt"):
        read_embedding(evil)
    with open(evil, "wb") as handle:  # a plain pickle of protocol 4, which torch.load reads as a legacy file
        pickle.dump({"string_to_param": {"*": Payload()}}, handle, protocol=4)
    with pytest.raises(CheckpointError, match="not a PyTorch file of tensors alone"):
        read_embedding(evil)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch file of tensors alone"):
        read_embedding(junk)
    custom = tmp_path / "custom.pt"
    torch.save({"string_to_param": {"*": vectors(1, 1)}, "extra": Path("x")}, custom)
    with pytest.raises(CheckpointError, match="builds a pathlib"):
        read_embedding(custom)


def test_infotext_names_the_embeddings_used_with_a1111s_hash(tmp_path):
    pipe = ldm_pipeline(diffusers_pipeline())
    used, unused = write(tmp_path, "a1111-pt", "zorblat", vectors(1, 11)), write(tmp_path, "a1111-pt", "other", vectors(1, 12))
    neg = write(tmp_path, "a1111-safetensors", "smudge", vectors(2, 13))
    pipe.load_embeddings(tmp_path)
    result = pipe("a (zorblat:1.1) cat", negative_prompt="smudge", num_inference_steps=2, height=64, width=64, seed=1)

    def short(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    params = result.parameters[0]
    assert params.extra["TI hashes"] == f"zorblat: {short(used)}, smudge: {short(neg)}"
    assert f'TI hashes: "zorblat: {short(used)}, smudge: {short(neg)}"' in format_parameters(params)
    assert "other" not in params.extra["TI hashes"] and unused.exists()
    plain = pipe("a cat", num_inference_steps=2, height=64, width=64, seed=1)
    assert "TI hashes" not in plain.parameters[0].extra
    unguided = pipe("a cat", negative_prompt="smudge", guidance_scale=1.0, num_inference_steps=2, height=64, width=64, seed=1)
    assert "TI hashes" not in unguided.parameters[0].extra  # a negative prompt that is not encoded uses nothing


def test_txt2img_embeddings_flag(tmp_path, capsys):
    model = save_diffusers_folder(tmp_path / "tiny", "sd1")
    folder = tmp_path / "embeddings"
    path = write(folder, "a1111-pt", "zorblat", vectors(2, 14))
    fast = ["--model", model, "--steps", "2", "--width", "64", "--height", "64", "--quiet", "--seed", "3"]
    code = main(["txt2img", "a zorblat cat", "--embeddings", str(folder), "--out", str(tmp_path / "out"), *map(str, fast)])
    assert code == 0
    params = read_parameters(tmp_path / "out" / "00000-3.png")
    assert params.extra["TI hashes"] == f"zorblat: {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    capsys.readouterr()
    code = main(["txt2img", "a cat", "--embeddings", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), *map(str, fast)])
    assert code == 2 and "--embeddings" in capsys.readouterr().err
