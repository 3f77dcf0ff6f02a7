"""``<lora:NAME:TE:UNET>`` prompt tags: parsing as A1111 does, the LoRAs they make active for a call (and
only for it), the text that is encoded, ``Lora hashes`` in the infotext, ``ldm txt2img --loras-dir``."""

from __future__ import annotations

import hashlib
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_training_support import micro_models, one_torch_thread  # noqa: F401 - one_torch_thread is an autouse fixture
from test_txt2img_cli import FAST, run
from tiny_models import save_diffusers_folder

from ldm.errors import CheckpointError, InputError, SettingError
from ldm.images import read_parameters
from ldm.pipeline import Pipeline, stages
from ldm.prompts import split_lora_tags
from ldm.settings import GenerationSettings

CALL = {"num_inference_steps": 2, "width": 32, "height": 32, "guidance_scale": 3.0, "output_type": "pt"}


def write_lora(unet, text_encoder, path, seed: int, rank: int = 2, metadata: dict | None = None):
    """A kohya LoRA on the first cross-attention key projection of ``unet`` and the first CLIP query projection."""
    modules = {"lora_unet_": next(n for n, _ in unet.named_modules() if n.endswith("attn2.to_k"))}
    clip = next(n for n, _ in text_encoder.named_modules() if n.endswith("self_attn.q_proj"))
    modules["lora_te_text_model_"] = clip.removeprefix("text_model.")
    models = {"lora_unet_": unet, "lora_te_text_model_": text_encoder}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, name in modules.items():
        weight = models[prefix].get_submodule(name).weight
        key = prefix + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=generator) * 0.5
        tensors[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=generator) * 0.5
    save_file(tensors, str(path), metadata=metadata)
    return path


def micro_pipe(loras_dir=None) -> Pipeline:
    models = micro_models()
    pipe = Pipeline(models.unet, models.vae, models.text_encoder, models.tokenizer, models.scheduler_config)
    return pipe.configure(loras_dir=loras_dir) if loras_dir is not None else pipe


@pytest.fixture
def loras(tmp_path):
    """A LoRA folder: style and detail (one in a subfolder), for the micro models."""
    models = micro_models()
    folder = tmp_path / "loras"
    (folder / "more").mkdir(parents=True)
    write_lora(models.unet, models.text_encoder, folder / "style.safetensors", seed=0)
    write_lora(models.unet, models.text_encoder, folder / "more" / "detail.safetensors", seed=1)
    return folder


def image(pipe: Pipeline, prompt: str, seed: int = 3) -> torch.Tensor:
    return pipe(prompt, negative_prompt="blurry", seed=seed, **CALL).images


def state(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part, net in (("unet", pipe.unet), ("te", pipe.text_encoder)) for k, v in net.state_dict().items()}


# --- parsing ---------------------------------------------------------------------------------------

# A1111's examples (modules/extra_networks.py, Lora's extra_networks_lora.py): text -> (encoded text, [(name, te, unet)])
PARSED = {
    "1girl, <lora:agm:1.1> <lora:ray>": ("1girl,  ", [("agm", 1.1, 1.1), ("ray", 1.0, 1.0)]),
    "a cat <lora:style:0.5:1.2>": ("a cat ", [("style", 0.5, 1.2)]),
    "<lora:style:te=0.5:unet=1.2>x": ("x", [("style", 0.5, 1.2)]),
    "<lora:style:0.4:unet=0.9>": ("", [("style", 0.4, 0.9)]),
    "<lora:style:unet=0.3>": ("", [("style", 1.0, 0.3)]),
    "<lyco:style:-1>, dark": (", dark", [("style", -1.0, -1.0)]),
    "(red:1.2) <lora:my style:.5> BREAK b": ("(red:1.2)  BREAK b", [("my style", 0.5, 0.5)]),
    "a < b, <3, <lora:> and <:x>": ("a < b, <3, <lora:> and <:x>", []),  # A1111's pattern does not match these
}


@pytest.mark.parametrize("text", PARSED)
def test_tags_parse_as_a1111_reads_them(text):
    remaining, tags = split_lora_tags(text)
    assert (remaining, [(t.name, t.text_encoder, t.unet) for t in tags]) == PARSED[text]


REFUSED = {
    "<hypernet:x:1> a cat": "has <hypernet:x:1>, an extra network of kind 'hypernet' that ldm does not apply",
    "<lora:style:abc>": "<lora:style:abc> has the weight 'abc', which is not a number",
    "<lora:style:nan>": "has the weight 'nan'; give a finite number",
    "<lora:style:1:1:8>": "a fourth argument",
    "<lora:style:dyn=8>": "the argument dyn=",
    "<lora: :1>": "names no LoRA",
    "<lora:style:1> <lyco:style:0.5>": "names LoRA 'style' twice",
}


@pytest.mark.parametrize("text", REFUSED)
def test_malformed_tags_are_one_line_errors_naming_the_prompt(text):
    with pytest.raises(SettingError, match=REFUSED[text]) as caught:
        GenerationSettings(prompt=text)
    assert caught.value.fields[0] == "prompt"


def test_tags_act_in_the_prompt_only_and_one_call_names_one_set():
    with pytest.raises(SettingError, match="negative_prompt has <lora:style:1>, but LoRA tags act only in prompt"):
        GenerationSettings(prompt="a cat", negative_prompt="<lora:style:1>")
    differing = GenerationSettings(prompt=["a <lora:style:0.5>", "b <lora:style:0.6>"])  # fine alone (ldm txt2img runs each)
    with pytest.raises(SettingError, match="the prompts of one call name different LoRAs"):
        differing.lora_tags()
    same = GenerationSettings(prompt=["a <lora:style:0.5> <lora:detail>", "<lora:detail:1><lora:style:0.5> b"])
    assert [t.name for t in same.lora_tags()] == ["style", "detail"]


# --- applying --------------------------------------------------------------------------------------


def test_the_encoded_text_is_the_prompt_without_its_tags(loras):
    pipe = micro_pipe(loras)
    plain = micro_pipe()
    unet_only = loras / "unet_only.safetensors"
    tensors = {k: v for k, v in _tensors(loras / "style.safetensors").items() if k.startswith("lora_unet_")}
    save_file(tensors, str(unet_only))  # leaves the text encoder as it is
    settings = GenerationSettings(prompt="a red <lora:unet_only:0.7>cat", negative_prompt="blurry", guidance_scale=3.0, seed=1)
    call = stages.resolve(pipe, settings, None, None, None)
    stages.apply_loras(pipe, call)
    tagged = stages.encode_prompts(pipe, call)
    without = GenerationSettings(prompt="a red cat", negative_prompt="blurry", guidance_scale=3.0, seed=1)
    expected = stages.encode_prompts(plain, stages.resolve(plain, without, None, None, None))
    assert torch.equal(tagged.cond_at(0), expected.cond_at(0)) and torch.equal(tagged.both_at(0), expected.both_at(0))


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_tag_gives_the_image_of_load_lora_with_the_prompt_without_it(loras):
    tagged = image(micro_pipe(loras), "a cat <lora:style:0.6>")
    explicit = micro_pipe()
    explicit.load_lora(loras / "style.safetensors", scale=0.6)
    assert torch.equal(tagged, image(explicit, "a cat "))
    assert not torch.equal(tagged, image(micro_pipe(), "a cat "))
    # Separate text-encoder and U-Net multipliers: the adapter's own scales per network.
    split = image(micro_pipe(loras), "a cat <lora:style:0.2:0.9>")
    reference = micro_pipe()
    reference._adapter_stack().load(loras / "style.safetensors", scale=0.9, text_encoder_scale=0.2)
    assert torch.equal(split, image(reference, "a cat "))
    assert not torch.equal(split, image(micro_pipe(loras), "a cat <lora:style:0.9>"))


def test_switching_between_calls_equals_fresh_pipelines_and_restores_the_weights(loras):
    pipe = micro_pipe(loras)
    original = state(pipe)
    prompts = [
        "a cat <lora:style:0.5>", "a cat", "a cat <lora:style:1.0>", "a cat <lora:detail:0.8> <lora:style:0.5>",
        "a cat <lora:style:0.5> <lora:detail:0.8>", "a cat <lora:detail:te=0:unet=0.8>", "a cat",
    ]
    for prompt in prompts:
        assert torch.equal(image(pipe, prompt), image(micro_pipe(loras), prompt)), prompt
    assert all(torch.equal(value, original[key]) for key, value in state(pipe).items())
    assert pipe.lora_adapters() == [] and pipe.adapters == []


def test_adapters_loaded_by_name_are_never_touched(loras):
    pipe = micro_pipe(loras)
    pipe.load_lora(loras / "more" / "detail.safetensors", scale=0.7)
    image(pipe, "a cat <lora:style:0.5>")
    assert [(a.name, a.scale) for a in pipe.lora_adapters()] == [("detail", 0.7), ("<lora:style>", 0.5)]
    assert pipe.adapters == [("detail", 0.7)]  # "Lora" in the infotext: the tags are in the prompt
    fresh = micro_pipe(loras)
    fresh.load_lora(loras / "more" / "detail.safetensors", scale=0.7)
    assert torch.equal(image(pipe, "a cat <lora:detail:0.3>"), image(fresh, "a cat <lora:detail:0.3>"))
    image(pipe, "a cat")
    assert [(a.name, a.scale) for a in pipe.lora_adapters()] == [("detail", 0.7)]
    alone = micro_pipe()
    alone.load_lora(loras / "more" / "detail.safetensors", scale=0.7)
    assert torch.equal(image(pipe, "a dog"), image(alone, "a dog"))


def test_a_name_the_folder_lacks_or_no_folder_is_an_error_that_changes_nothing(loras):
    pipe = micro_pipe(loras)
    image(pipe, "a cat <lora:style:0.5>")
    before = state(pipe)
    with pytest.raises(SettingError, match=rf"prompt: <lora:missing:1>: LoRA 'missing' not found in {loras}") as caught:
        image(pipe, "a cat <lora:missing:1>")
    assert caught.value.fields == ["prompt"]
    with pytest.raises(SettingError, match="the prompts of one call name different LoRAs"):
        pipe(["a <lora:style:0.5>", "b"], seed=1, **CALL)
    assert all(torch.equal(value, before[key]) for key, value in state(pipe).items())
    with pytest.raises(SettingError, match=r"no LoRA folder is set to find 'style' in; pass --loras-dir DIR \(Python: pipe.configure"):
        image(micro_pipe(), "a cat <lora:style>")
    with pytest.raises(Exception, match="loras_dir .* is not a folder"):
        micro_pipe(loras / "style.safetensors")


def test_a_kohya_alias_names_a_file_and_an_ambiguous_name_is_refused(loras):
    models = micro_models()
    write_lora(models.unet, models.text_encoder, loras / "renamed-v2.safetensors", seed=0, metadata={"ss_output_name": "kohya_name"})
    pipe = micro_pipe(loras)
    assert torch.equal(image(pipe, "a <lora:kohya_name:0.5>"), image(micro_pipe(loras), "a <lora:style:0.5>"))
    write_lora(models.unet, models.text_encoder, loras / "more" / "style.pt", seed=2)
    with pytest.raises(SettingError, match="LoRA 'style' is ambiguous in"):
        image(pipe, "a <lora:style:0.5>")


def test_infotext_keeps_the_tags_and_adds_a1111s_lora_hashes(loras):
    models = micro_models()
    write_lora(models.unet, models.text_encoder, loras / "kohya.safetensors", seed=4, metadata={"sshs_model_hash": "ABCDEF0123456789" * 4})
    result = micro_pipe(loras)("a cat <lora:style:0.5>, <lora:detail> <lora:kohya:0.1>", seed=2, num_inference_steps=2, width=32, height=32)
    params = result.parameters[0]
    assert params.prompt == "a cat <lora:style:0.5>, <lora:detail> <lora:kohya:0.1>"
    data = (loras / "style.safetensors").read_bytes()
    tensor_bytes = data[8 + int.from_bytes(data[:8], "little"):]  # A1111 hashes a .safetensors file's tensors
    detail = (loras / "more" / "detail.safetensors").read_bytes()
    detail_hash = hashlib.sha256(detail[8 + int.from_bytes(detail[:8], "little"):]).hexdigest()[:12]
    assert params.extra["Lora hashes"] == f"style: {hashlib.sha256(tensor_bytes).hexdigest()[:12]}, detail: {detail_hash}, kohya: abcdef012345"
    assert "Lora" not in params.extra
    folder = loras / "saved"
    text = read_parameters(result.save(folder)[0])
    assert text.extra["Lora hashes"] == params.extra["Lora hashes"] and text.prompt == params.prompt


def test_a_pt_lora_hashes_the_whole_file(loras):
    from ldm.adapters import lora_hash

    path = loras / "plain.pt"
    path.write_bytes(b"any bytes")
    assert lora_hash(path) == hashlib.sha256(b"any bytes").hexdigest()[:12]


def test_a_pt_lora_in_the_folder_gives_the_image_of_its_safetensors_twin_and_a_pickle_is_refused(loras):
    torch.save(_tensors(loras / "style.safetensors"), loras / "twin.pt")
    pipe = micro_pipe(loras)
    assert torch.equal(image(pipe, "a red cat <lora:twin:0.7>"), image(pipe, "a red cat <lora:style:0.7>"))
    (loras / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="as a torch file of tensors"):
        image(pipe, "a red cat <lora:evil:1>")


def test_a_call_inside_a_tagged_call_must_name_the_same_loras_as_it(loras):
    """The tags' LoRAs are in the shared weights while a call runs: a call from its callback (or another thread)
    with other tags is refused instead of changing the weights under it; with the same tags it runs."""
    pipe = micro_pipe(loras)
    expected = image(pipe, "a red cat <lora:style:0.7>")
    inner = []

    def callback(i, t, latents, denoised):
        if i == 0:
            for other in ("a dog", "a dog <lora:style:0.5>", "a dog <lora:detail>"):
                with pytest.raises(InputError, match="another call on this pipeline .* other <lora:...> tags"):
                    image(pipe, other)
            inner.append(image(pipe, "a dog <lora:style:0.7>"))

    got = pipe("a red cat <lora:style:0.7>", negative_prompt="blurry", seed=3, callback=callback, **CALL).images
    assert len(inner) == 1 and torch.equal(got, expected)
    assert torch.equal(image(pipe, "a dog"), image(micro_pipe(), "a dog"))  # afterwards, other tags apply again


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


# --- ldm txt2img --loras-dir -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny-sd1", "sd1")


def test_cli_loras_dir_applies_tags_and_refuses_bad_ones_with_exit_2(model, tmp_path, capsys):
    pipe = Pipeline.from_pretrained(model)
    folder = tmp_path / "loras"
    folder.mkdir()
    write_lora(pipe.unet, pipe.text_encoder, folder / "style.safetensors", seed=0)
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "a cat <lora:style:0.8>", "--model", model, "--seed", 4, "--loras-dir", folder, "--out", out, *FAST)
    assert code == 0
    params = read_parameters(stdout.split()[0])
    assert params.prompt == "a cat <lora:style:0.8>" and params.extra["Lora hashes"].startswith("style: ")
    explicit = Pipeline.from_pretrained(model)
    explicit.load_lora(folder / "style.safetensors", scale=0.8)
    expected = explicit("a cat ", seed=4, num_inference_steps=2, width=64, height=64, output_type="np").images[0]
    written = np.asarray(Image.open(stdout.split()[0]), dtype=int)
    assert np.abs(written - np.round(expected * 255)).max() <= 1
    for argv, message in (
        (["a <lora:missing:1>", "--loras-dir", folder], "<lora:missing:1> in the prompt: LoRA 'missing' not found in"),
        (["a <lora:style:1>"], "no LoRA folder is set to find 'style' in; pass --loras-dir DIR"),
        (["a <hypernet:x:1>", "--loras-dir", folder], "PROMPT has <hypernet:x:1>"),
        (["a cat", "--negative-prompt", "<lora:style:1>", "--loras-dir", folder], "--negative-prompt has <lora:style:1>"),
        (["a cat", "--loras-dir", folder / "none"], "--loras-dir .* is not a folder"),
    ):
        code, _, stderr = run(capsys, *argv, "--model", model, "--out", out, *FAST)
        assert code == 2 and len(stderr.strip().splitlines()) == 1
        assert re.search(message, stderr), stderr
