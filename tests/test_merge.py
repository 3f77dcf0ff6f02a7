"""`ldm merge`: weighted sum and add difference against a direct computation of every tensor, LoRAs baked in
equal `load_lora(fuse=True)`, images of the merged file and folder, refusals, and the memory of a full-size merge."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ldm.cli import main
from ldm.loading import DEFAULT_MODEL_DIR, load_components
from ldm.loading.writers import write_safetensors

ALPHA = 0.3


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def _noisy(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: value + 0.05 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in tensors.items()
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """ldm-shapes as a single file (A) and two perturbed copies of it (B, C), fp32."""
    folder = tmp_path_factory.mktemp("models")
    a = folder / "a.safetensors"
    assert main(["convert", str(DEFAULT_MODEL_DIR), str(a)]) == 0
    tensors, metadata = _read(a)
    paths = {"a": a}
    for name, seed in (("b", 1), ("c", 2)):
        paths[name] = folder / f"{name}.safetensors"
        write_safetensors(paths[name], _noisy(tensors, seed), metadata)
    return paths


def _merge(*args) -> int:
    return main(["merge", *map(str, args)])


def _image(model) -> torch.Tensor:
    from ldm.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model)
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, seed=0, output_type="pt").images


@pytest.mark.parametrize("parts", ["unet", "unet,text_encoder,vae"])
def test_weighted_sum_is_the_direct_computation_on_every_tensor(models, parts, tmp_path):
    out = tmp_path / "merged.safetensors"
    assert _merge(models["a"], models["b"], "--alpha", ALPHA, "--parts", parts, out) == 0
    (a, metadata), (b, _), (merged, merged_metadata) = _read(models["a"]), _read(models["b"]), _read(out)
    assert merged.keys() == a.keys()
    prefixes = tuple({"unet": "model.diffusion_model.", "text_encoder": "cond_stage_model.", "vae": "first_stage_model."}[p]
                     for p in parts.split(","))  # fmt: skip
    for key, value in a.items():
        if key.startswith(prefixes) and value.is_floating_point():
            assert torch.allclose(merged[key], (1 - ALPHA) * value + ALPHA * b[key], atol=1e-6, rtol=0), key
        else:
            assert torch.equal(merged[key], value), key  # copied from A
    assert merged_metadata["ldm.scheduler_config"] == metadata["ldm.scheduler_config"]
    assert json.loads(merged_metadata["ldm.merge_recipe"])["method"] == "weighted-sum"


def test_add_difference_is_the_direct_computation_and_gives_its_image(models, tmp_path):
    out = tmp_path / "merged.safetensors"
    assert _merge(models["a"], models["b"], models["c"], "--alpha", ALPHA, "--parts", "unet,text_encoder", out) == 0
    (a, metadata), (b, _), (c, _) = _read(models["a"]), _read(models["b"]), _read(models["c"])
    merged, _ = _read(out)
    direct = {}
    for key, value in a.items():
        merged_part = key.startswith(("model.diffusion_model.", "cond_stage_model.")) and value.is_floating_point()
        direct[key] = value + ALPHA * (b[key] - c[key]) if merged_part else value
        assert torch.allclose(merged[key], direct[key], atol=1e-6, rtol=0), key
    # The merged file, and a folder made by the merge, give the image of the directly merged weights.
    direct_path = tmp_path / "direct.safetensors"
    write_safetensors(direct_path, direct, metadata)
    folder = tmp_path / "merged-folder"
    assert _merge(models["a"], models["b"], models["c"], "--alpha", ALPHA, "--parts", "unet,text_encoder", folder) == 0
    expected = _image(direct_path)
    assert torch.allclose(_image(out), expected, atol=1e-5)
    assert torch.allclose(_image(folder), expected, atol=1e-5)


def _lora_file(path: Path, model_path: Path) -> Path:
    """A LoRA on a U-Net attention projection and a ResNet conv, a LoHa on a CLIP projection, a diff with a bias."""
    from ldm.adapters.keys import module_lookup

    parts = load_components(model_path)
    unet = module_lookup("unet", parts.unet)
    text = module_lookup("text_encoder", parts.text_encoder)
    q = next(name for name in unet if name.endswith("attn2_to_q"))
    conv = next(name for name in unet if name.endswith("resnets_0_conv1") and name.startswith("down_blocks"))
    proj_in = next(name for name in unet if name.endswith("proj_in"))
    clip = next(name for name in text if name.endswith("self_attn_v_proj"))
    generator = torch.Generator().manual_seed(5)

    def rand(*shape):
        return 0.1 * torch.randn(shape, generator=generator)

    q_out, q_in = unet[q][1].weight.shape
    c_out, c_in, kh, kw = unet[conv][1].weight.shape
    v_out, v_in = text[clip][1].weight.shape
    p_weight, p_bias = unet[proj_in][1].weight, unet[proj_in][1].bias
    tensors = {
        f"lora_unet_{q}.lora_down.weight": rand(2, q_in), f"lora_unet_{q}.lora_up.weight": rand(q_out, 2),
        f"lora_unet_{q}.alpha": torch.tensor(1.0),
        f"lora_unet_{conv}.lora_down.weight": rand(3, c_in, kh, kw), f"lora_unet_{conv}.lora_up.weight": rand(c_out, 3, 1, 1),
        f"lora_te_{clip}.hada_w1_a": rand(v_out, 2), f"lora_te_{clip}.hada_w1_b": rand(2, v_in),
        f"lora_te_{clip}.hada_w2_a": rand(v_out, 2), f"lora_te_{clip}.hada_w2_b": rand(2, v_in),
        f"lora_unet_{proj_in}.diff": rand(*p_weight.shape), f"lora_unet_{proj_in}.diff_b": rand(*p_bias.shape),
    }  # fmt: skip
    write_safetensors(path, tensors, {})
    return path


def test_lora_merge_equals_load_lora_fused(models, tmp_path):
    from ldm.adapters import Adapters

    lora = _lora_file(tmp_path / "style.safetensors", models["a"])
    out = tmp_path / "with-lora.safetensors"
    assert _merge(models["a"], "--lora", f"{lora}:0.8", "--lora", f"{lora}:-0.3", out) == 0
    fused = load_components(models["a"])
    adapters = Adapters(fused.unet, fused.text_encoder)
    adapters.load(lora, scale=0.8, fuse=True)
    adapters.load(lora, scale=-0.3, fuse=True, name="again")
    merged = load_components(out)
    changed = 0
    for part in ("unet", "vae", "text_encoder"):
        expected, got = getattr(fused, part).state_dict(), getattr(merged, part).state_dict()
        for key in expected:
            assert torch.allclose(got[key], expected[key], atol=1e-6, rtol=0), (part, key)
        base = getattr(load_components(models["a"]), part).state_dict()
        changed += sum(not torch.equal(base[key], got[key]) for key in base)
    assert changed == 5  # q, conv1, v_proj, proj_in weight and bias


def test_refusals_are_one_line(models, tmp_path, capsys):
    a, _ = _read(models["a"])
    key = next(k for k in a if k.startswith("model.diffusion_model.") and k.endswith("proj_in.weight"))
    wrong = tmp_path / "wrong.safetensors"
    write_safetensors(wrong, {**a, key: torch.zeros(3, *a[key].shape[1:])}, {})
    missing = tmp_path / "missing.safetensors"
    write_safetensors(missing, {k: v for k, v in a.items() if k != key}, {})
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"")
    cases = [
        ((models["a"], wrong, tmp_path / "o1.safetensors"), f"{key} is {list(a[key].shape)} in"),
        ((models["a"], missing, tmp_path / "o2.safetensors"), f"has no {key}"),
        ((missing, models["a"], tmp_path / "o3.safetensors"), f"has {key}, which"),
        ((models["a"], models["b"], existing), "already exists; ldm merge never overwrites"),
        ((models["a"], models["b"], "--method", "add-difference", tmp_path / "o4.safetensors"), "add-difference merges 3 models, got 2"),
        ((models["a"], tmp_path / "o5.safetensors"), "or one model and --lora"),
        ((DEFAULT_MODEL_DIR, models["a"], tmp_path / "o6.safetensors"), "is a folder; ldm merge reads single files"),
    ]
    for args, message in cases:
        assert _merge(*args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert existing.read_bytes() == b"" and not list(tmp_path.glob("o*.safetensors"))


MEMORY_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from ldm.loading.merge import MergeRecipe, merge
    torch.set_num_threads(1)
    a, b, out = map(Path, sys.argv[1:4])
    merge(MergeRecipe((a, b), "weighted-sum", 0.5, ("unet", "text_encoder", "vae")), out)
    status = Path("/proc/self/status").read_text()
    print(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) * 1024)
    """
)


@pytest.mark.slow
def test_merging_two_full_size_models_holds_less_than_two_model_sizes(tmp_path):
    """Two random SD 1.5-shaped fp16 single files (1.07 G values, 2.1 GB each): the merge's resident-memory high-water
    mark (VmHWM, imports included) stays below two model sizes; it is about one tensor plus the interpreter."""
    from transformers import CLIPTextModel

    from ldm.loading.single_file import single_file_state
    from ldm.loading.writers import write_safetensors_streamed
    from ldm.models import AutoencoderKL, UNet, UNetConfig, VAEConfig
    from ldm.models.text_encoder import clip_config
    from ldm.schedulers import SchedulerConfig

    class Meta:
        family, scheduler_config, text_encoder_2 = "sd1", SchedulerConfig(), None

    with torch.device("meta"):
        Meta.unet, Meta.vae, Meta.text_encoder = UNet(UNetConfig.sd1()), AutoencoderKL(VAEConfig.sd()), CLIPTextModel(clip_config("sd1"))
    specs = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in single_file_state(Meta).items()}
    size = sum(v.numel() * v.element_size() for v in specs.values())
    assert size > 2 * 10**9
    paths = []
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)

        def produce(key, generator=generator):
            spec = specs[key]
            if not spec.is_floating_point():
                return torch.arange(spec.shape[-1]).expand(spec.shape).contiguous()
            return torch.empty(spec.shape, dtype=torch.float16).uniform_(-0.1, 0.1, generator=generator)

        paths.append(tmp_path / f"{seed}.safetensors")
        write_safetensors_streamed(paths[-1], specs, produce, {})
    out = tmp_path / "merged.safetensors"
    result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, *map(str, (*paths, out))], capture_output=True, text=True, check=True)
    peak = int(result.stdout.split()[-1])
    print(f"model {size / 2**30:.2f} GiB, merge peak RSS {peak / 2**30:.2f} GiB")
    assert peak < 2 * size
    assert out.stat().st_size > size  # every tensor written (the values are checked on small models above)
