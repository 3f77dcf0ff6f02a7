"""The CPU fast paths chosen per CPU (ldm.kernels.choice), the CPU's flags (ldm.kernels.cpu), and bf16 run right.

Each fast path gives the plain call's result (tests/test_speedups.py); here: the probe's two routes compute the
same thing, the choice follows the measured times, it is measured once per CPU and dtype and then read from
the cache, the pipeline applies it (and any choice gives the same image), bf16 runs each network channels-last
where that measured faster (every map of a call staying in it), its normalizations and attention reduced in
fp32, and a CPU without native bf16 is told so.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm.kernels import choice as choice_module
from ldm.kernels.choice import LAYOUT_SHAPES, PLAIN, KernelChoice, choose, kernel_choice, layout_routes, routes
from ldm.kernels.cpu import this_cpu

@pytest.fixture(scope="module")
def tiny_pipe_files(tmp_path_factory) -> Path:
    from tiny_models import save_diffusers_folder

    return save_diffusers_folder(tmp_path_factory.mktemp("model"))


EVERY_PATH = KernelChoice(linear_as_conv=True, attention_as_conv=True, sliced_conv=True, subpixel_upsample=True)
CPU = torch.device("cpu")


def test_each_probed_path_s_two_routes_compute_the_same_result():
    with torch.inference_mode():
        layouts = {name: layout_routes(torch.float32, shapes) for name, shapes in LAYOUT_SHAPES.items()}
        probes = {**routes(torch.float32), **routes(torch.float32, torch.channels_last), **layouts}
        for name, (plain, fast) in probes.items():
            for expected, got in zip(*(_as_list(route()) for route in (plain, fast)), strict=True):
                # fp32 rounding of sums over up to 5760 products, at the scale of the result
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(), msg=name)


def _as_list(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, list) else [result]


def test_a_fast_path_is_taken_only_where_it_measured_clearly_faster():
    seconds = {"linear_as_conv": (1.0, 0.5), "attention_as_conv": (1.0, 2.0), "sliced_conv": (1.0, 0.97), "subpixel_upsample": (1.0, 0.95)}
    assert choose(seconds) == KernelChoice(linear_as_conv=True, subpixel_upsample=True)


def test_the_choice_is_measured_once_per_cpu_and_dtype_then_read_from_the_cache(monkeypatch, tmp_path):
    measured = []

    def fake_measure(dtype):
        measured.append(dtype)
        fast = 0.5 if dtype == torch.float32 else 2.0
        return {name: (1.0, fast) for name in ("linear_as_conv", "attention_as_conv", "sliced_conv", "subpixel_upsample")}

    monkeypatch.setattr(choice_module, "measure", fake_measure)
    assert kernel_choice(CPU, torch.float32, tmp_path) == EVERY_PATH
    assert kernel_choice(CPU, torch.float32, tmp_path) == EVERY_PATH
    assert kernel_choice(CPU, torch.bfloat16, tmp_path) == PLAIN
    assert measured == [torch.float32, torch.bfloat16]
    text = (tmp_path / "kernels.json").read_text()
    assert this_cpu().model in text and torch.__version__ in text and "seconds" in text
    (tmp_path / "kernels.json").write_text("{not json")  # a damaged cache is measured again
    assert kernel_choice(CPU, torch.float32, tmp_path) == EVERY_PATH and len(measured) == 3
    assert kernel_choice(torch.device("meta"), torch.float32, tmp_path) == PLAIN and len(measured) == 3


@pytest.mark.parametrize(
    ("cpuinfo", "model", "native"),
    [
        ("model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx2 fma avx512f amx_bf16 amx_tile avx512_bf16\n", "Intel(R) Xeon(R) Platinum 8480+", True),
        ("model name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n", "AMD EPYC 7B13", False),
        ("processor\t: 0\nFeatures\t: fp asimd bf16 sve\nModel\t: Raspberry\n", "Raspberry", True),
    ],
)
def test_the_cpu_s_model_flags_and_native_bf16_are_read_from_cpuinfo(tmp_path, cpuinfo, model, native):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    cpu = this_cpu(tmp_path / "cpuinfo")
    assert cpu.model == model and cpu.native_bf16 == native
    assert "fpu" not in cpu.flags and cpu.key.startswith(model)


def test_a_bf16_pipeline_on_a_cpu_without_native_bf16_warns_once_with_the_measured_slowdown(monkeypatch, tiny_pipe_files):
    from ldm import Pipeline
    from ldm.kernels.cpu import CPU as CPUInfo

    monkeypatch.setattr(choice_module, "this_cpu", lambda: CPUInfo("Old CPU 9000", ("avx2", "fma")))
    monkeypatch.setattr(choice_module, "bf16_slowdown", lambda: 3.25)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = Pipeline.from_pretrained(tiny_pipe_files, dtype=torch.bfloat16)
        pipe.configure(attention="sliced")  # no new dtype: nothing more said
    messages = [str(w.message) for w in caught if "native bf16" in str(w.message)]
    assert messages == [
        "this CPU (Old CPU 9000) has no native bf16 (AVX512_BF16, AMX or Arm BF16): a bf16 matrix product took "
        "3.2x the time of fp32 here; use fp32 (--dtype fp32) for speed"
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Pipeline.from_pretrained(tiny_pipe_files)  # fp32: nothing to say
    assert not [w for w in caught if "native bf16" in str(w.message)]


def test_the_pipeline_applies_the_measured_choice_and_every_choice_gives_the_same_image(tiny_pipe_files):
    from ldm import Pipeline
    from ldm.models.attention import Linear
    from ldm.models.layers import Conv2d

    pipe = Pipeline.from_pretrained(tiny_pipe_files)
    measured = kernel_choice(CPU, torch.float32)
    layers = [m for net in (pipe.unet, pipe.vae) for m in net.modules() if isinstance(m, (Linear, Conv2d))]
    assert layers and all(layer.kernels == measured for layer in layers)
    images = {}
    for kernels in (PLAIN, EVERY_PATH):
        pipe.configure(kernels=kernels)
        assert all(layer.kernels == kernels for layer in layers)
        images[kernels] = pipe("a red circle", num_inference_steps=2, seed=1, output_type="pt", height=64, width=64).images
    torch.testing.assert_close(images[EVERY_PATH], images[PLAIN], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("unet", "vae"), [(True, False), (False, True)])
def test_bf16_on_the_cpu_runs_each_network_channels_last_where_it_measured_faster_unless_told_otherwise(
    monkeypatch, tmp_path, tiny_pipe_files, unet, vae
):
    from ldm import Pipeline

    faster, slower = (1.0, 0.5), (1.0, 2.0)
    seconds = {"unet_channels_last": faster if unet else slower, "vae_channels_last": faster if vae else slower, "sliced_conv": faster}
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(choice_module, "measure", lambda dtype: seconds if dtype == torch.bfloat16 else {})
    pipe = Pipeline.from_pretrained(tiny_pipe_files, dtype=torch.bfloat16)
    assert pipe.kernels == KernelChoice(sliced_conv=True, unet_channels_last=unet, vae_channels_last=vae)
    for weight, measured in ((pipe.unet.conv_in.weight, unet), (pipe.vae.decoder.conv_in.weight, vae)):
        assert weight.is_contiguous(memory_format=torch.channels_last) is measured
        assert weight.is_contiguous() is not measured
    for setting in (True, False):  # the setting overrides the measurements, both ways
        pipe.configure(channels_last=setting)
        assert pipe.memory_formats == (torch.channels_last if setting else torch.contiguous_format,) * 2
        for weight in (pipe.unet.conv_in.weight, pipe.vae.decoder.conv_in.weight):
            assert weight.is_contiguous(memory_format=torch.channels_last) is setting
    assert Pipeline.from_pretrained(tiny_pipe_files).memory_formats == (torch.contiguous_format,) * 2  # fp32: not measured


def test_in_channels_last_every_map_of_a_guided_unet_call_stays_channels_last(tiny_pipe_files):
    """The shared latent's skips are repeated to the guided batch with their layout (Tensor.repeat would give
    NCHW maps, which the next GroupNorm and convolution then run on or convert back)."""
    from ldm import Pipeline
    from ldm.models.layers import ResnetBlock

    pipe = Pipeline.from_pretrained(tiny_pipe_files).configure(channels_last=True)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda module, args: seen.append(args[0])) for m in pipe.unet.modules() if isinstance(m, ResnetBlock)]
    try:
        pipe("a red circle", num_inference_steps=1, seed=1, height=64, width=64, output_type="pt")
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == sum(isinstance(m, ResnetBlock) for m in pipe.unet.modules())
    assert all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in seen)


@pytest.mark.parametrize("faster", ["unet_channels_last", "vae_channels_last"])
def test_the_memory_formats_are_measured_in_bf16_first_and_the_convolution_paths_in_the_u_net_s(monkeypatch, faster):
    layouts = []
    timed = lambda pairs: {name: ([1.0], [0.5 if name == faster else 2.0]) for name in pairs}  # noqa: E731
    monkeypatch.setattr(choice_module, "_timed", timed)
    monkeypatch.setattr(choice_module, "routes", lambda dtype, layout: layouts.append(layout) or {"sliced_conv": None})
    assert set(choice_module.measure(torch.bfloat16)) == {"unet_channels_last", "vae_channels_last", "sliced_conv"}
    assert set(choice_module.measure(torch.float32)) == {"sliced_conv"}
    unet_layout = torch.channels_last if faster == "unet_channels_last" else torch.contiguous_format
    assert layouts == [unet_layout, torch.contiguous_format]


def test_a_cached_choice_without_the_layout_fields_is_measured_again(monkeypatch, tmp_path):
    measured = []
    monkeypatch.setattr(choice_module, "measure", lambda dtype: measured.append(dtype) or {"unet_channels_last": (1.0, 0.5)})
    key = f"{choice_module._machine()} | {torch.bfloat16}"
    old = {f: False for f in ("linear_as_conv", "attention_as_conv", "sliced_conv", "subpixel_upsample")}
    (tmp_path / "kernels.json").write_text(json.dumps({key: {"choice": old, "seconds": {}}}))
    assert kernel_choice(CPU, torch.bfloat16, tmp_path) == KernelChoice(unet_channels_last=True)
    assert measured == [torch.bfloat16]


def test_each_network_and_its_inputs_get_its_own_memory_format(monkeypatch, tmp_path, tiny_pipe_files):
    """U-Net in NCHW, VAE in channels-last: the latents reach the U-Net in NCHW, the VAE's encoder and decoder
    inputs arrive channels-last, and a VAE loaded later and a ControlNet (the U-Net's) follow."""
    from ldm import Pipeline
    from ldm.pipeline.control import _fit

    seconds = {"unet_channels_last": (1.0, 2.0), "vae_channels_last": (1.0, 0.5)}
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(choice_module, "measure", lambda dtype: seconds if dtype == torch.bfloat16 else {})
    pipe = Pipeline.from_pretrained(tiny_pipe_files, dtype=torch.bfloat16)
    inputs = {}

    def keep(name: str):
        return lambda module, args: inputs.update({name: args[0]})  # returns None: the input goes on unchanged

    hooks = [pipe.unet.register_forward_pre_hook(keep("unet"))]
    hooks += [getattr(pipe.vae, name).register_forward_pre_hook(keep(name)) for name in ("decoder", "encoder")]
    try:
        image = pipe("a red circle", num_inference_steps=2, seed=1, height=64, width=64).images[0]
        pipe("a red circle", init_image=image, strength=0.5, num_inference_steps=2, seed=1)
    finally:
        for hook in hooks:
            hook.remove()
    assert inputs["unet"].is_contiguous() and not inputs["unet"].is_contiguous(memory_format=torch.channels_last)
    for name in ("decoder", "encoder"):
        assert inputs[name].is_contiguous(memory_format=torch.channels_last) and not inputs[name].is_contiguous(), name
    pipe.load_vae(tiny_pipe_files / "vae")
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    controlnet = torch.nn.Conv2d(8, 8, 3).to(memory_format=torch.channels_last)
    controlnet.set_attention = lambda *args: None
    _fit(pipe, controlnet)
    assert controlnet.weight.is_contiguous() and controlnet.weight.dtype == torch.bfloat16


def test_bf16_images_stay_within_a_stated_bound_of_fp32(tiny_pipe_files):
    """bf16 keeps 8 bits of mantissa: the same seed's image differs from fp32's by rounding that the denoising
    loop carries; on the tiny model the mean difference stays under 2 % of the range (max under 15 %)."""
    from ldm import Pipeline

    kwargs = dict(num_inference_steps=4, seed=3, output_type="pt", height=64, width=64)
    fp32 = Pipeline.from_pretrained(tiny_pipe_files)("a red circle", **kwargs).images
    bf16 = Pipeline.from_pretrained(tiny_pipe_files, dtype=torch.bfloat16)("a red circle", **kwargs).images
    diff = (bf16.float() - fp32).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.15, (diff.mean().item(), diff.max().item())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_bf16_normalizations_and_attention_reduce_in_fp32_and_round_once(layout):
    """GroupNorm, LayerNorm and SDPA take bf16 in and give bf16 out, but their means, variances and softmax are
    torch's fp32 (opmath) arithmetic: on inputs with a large mean, where a bf16 sum would lose everything,
    they equal the fp32 computation on the same inputs to within one bf16 rounding at the output's scale
    (attention computed step by step in bf16 misses that bound by more than 10x here)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 64, 32, 32, generator=g) * 0.5 + 30).bfloat16().contiguous(memory_format=layout)
    w, b = torch.randn(64, generator=g).bfloat16(), torch.randn(64, generator=g).bfloat16()
    tokens = x.flatten(2).transpose(1, 2)
    q, k, v = [(torch.randn(1, 4, 1024, 40, generator=g) * scale).bfloat16() for scale in (3, 3, 1)]
    cases = [
        (F.group_norm(x, 32, w, b, 1e-5), F.group_norm(x.float(), 32, w.float(), b.float(), 1e-5)),
        (F.layer_norm(tokens, (64,), w, b), F.layer_norm(tokens.float(), (64,), w.float(), b.float())),
        (F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q.float(), k.float(), v.float())),
    ]
    stepwise = ((q @ k.transpose(-1, -2)) * 40**-0.5).softmax(-1) @ v
    assert (stepwise.float() - cases[2][1]).abs().max() > 10 * cases[2][1].abs().max() * 2**-8
    for got, expected in cases:
        assert got.dtype == torch.bfloat16
        assert (got.float() - expected).abs().max() <= expected.abs().max() * 2**-8


def test_the_cli_says_in_one_line_that_bf16_is_slow_on_a_cpu_without_it(monkeypatch, tmp_path, capsys):
    from ldm.cli import main
    from ldm.kernels.cpu import CPU as CPUInfo

    monkeypatch.setattr(choice_module, "this_cpu", lambda: CPUInfo("Old CPU 9000", ("avx2",)))
    monkeypatch.setattr(choice_module, "bf16_slowdown", lambda: 4.0)
    args = ["txt2img", "a red circle", "--dtype", "bf16", "--steps", "1", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    lines = capsys.readouterr().err.splitlines()
    assert (
        "ldm txt2img: warning: this CPU (Old CPU 9000) has no native bf16 (AVX512_BF16, AMX or Arm BF16): a bf16 "
        "matrix product took 4.0x the time of fp32 here; use fp32 (--dtype fp32) for speed"
    ) in lines
