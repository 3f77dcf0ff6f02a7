"""Speed-up mechanisms of the U-Net: DeepCache and token merging, exact when switched off, attached per call."""

from __future__ import annotations

import copy
import threading
from types import SimpleNamespace

import pytest
import torch

from ldm.errors import ConfigError, InputError
from ldm.kernels.choice import KernelChoice
from ldm.models import UNet, UNetConfig
from ldm.models.attention import set_kernels
from ldm.models.unet import UNetHooks
from ldm.speedups import HookedUNet, speed_up
from ldm.speedups.deepcache import DeepCache
from ldm.speedups.tome import bipartite_soft_matching, token_merging_hooks

EVERY_PATH = KernelChoice(linear_as_conv=True, attention_as_conv=True, sliced_conv=True, subpixel_upsample=True)


@pytest.fixture(scope="module")
def unet() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny()).eval()


def _inputs(seed: int, batch: int = 2, side: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 77, 64, generator=g)


def _count_calls(module: torch.nn.Module) -> tuple[list[int], object]:
    calls = [0]
    handle = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


def _deepcache(unet: UNet, interval: int, branch: int = 2) -> tuple[HookedUNet, DeepCache]:
    cache = DeepCache(unet, interval, branch)
    return HookedUNet(unet, UNetHooks(blocks=cache)), cache


@torch.no_grad()
def test_speed_up_with_everything_off_is_the_unet_itself(unet):
    assert speed_up(unet) is unet
    assert speed_up(unet, deepcache_interval=1, token_merging=0.0) is unet


@torch.no_grad()
def test_deepcache_interval_1_equals_the_plain_unet(unet):
    cached, cache = _deepcache(unet, interval=1)
    for step, t in enumerate((900, 500, 100)):
        x, c = _inputs(step)
        assert torch.equal(cached(x, t, c), unet(x, t, c))
    assert cache.calls == cache.full_calls == 3


@pytest.mark.parametrize("branch", [1, 2, 3])
@torch.no_grad()
def test_a_cached_step_on_the_same_input_reproduces_the_full_step(unet, branch):
    # The cached feature is exactly what a full pass recomputes for the same input, so the shallow path must
    # route every fresh skip to the right up layer to give back the full output.
    cached, cache = _deepcache(unet, interval=2, branch=branch)
    x, c = _inputs(0)
    full = cached(x, 700, c)
    again = cached(x, 700, c)
    assert cache.full_calls == 1
    torch.testing.assert_close(again, full, rtol=0, atol=0)


@torch.no_grad()
def test_deepcache_interval_3_skips_the_deep_part_and_stays_close(unet):
    cached = speed_up(unet, deepcache_interval=3)
    deep, handle = _count_calls(unet.mid_block)
    errors = []
    try:
        for step, t in enumerate(torch.linspace(950, 50, 6).round()):
            # Neighbouring steps see slightly different latents, as in a denoising loop.
            x, c = _inputs(0)
            x = x + 0.05 * step * _inputs(step + 10)[0]
            exact, fast = unet(x, t, c), cached(x, t, c)
            errors.append((fast - exact).abs().max().item() / exact.abs().max().item())
    finally:
        handle.remove()
    assert deep[0] == 6 + 2  # six plain passes and two full DeepCache passes
    assert cached.hooks.blocks.full_calls == 2
    assert errors[0] == errors[3] == 0.0
    cached_errors = [e for i, e in enumerate(errors) if i % 3]
    assert all(0 < e < 0.5 for e in cached_errors)


@torch.no_grad()
def test_deepcache_recomputes_when_the_batch_changes(unet):
    cached, cache = _deepcache(unet, interval=4)
    x, c = _inputs(0)
    cached(x, 500, c)
    out = cached(x[1:], 480, c[1:])  # guidance dropped: the cached batch-2 feature does not fit
    assert cache.full_calls == 2
    assert torch.equal(out, unet(x[1:], 480, c[1:]))


@torch.no_grad()
def test_deepcache_with_a_shared_sample_equals_deepcache_with_the_repeated_sample(unet):
    # Guided denoising passes each latent once for both passes; cached steps must repeat the fresh skips.
    (shared, shared_cache), (repeated, repeated_cache) = _deepcache(unet, 2), _deepcache(unet, 2)
    for step, t in enumerate((900, 850, 800)):
        x, _ = _inputs(step, batch=1)
        c = _inputs(step + 10)[1]
        torch.testing.assert_close(shared(x, t, c), repeated(torch.cat([x, x]), t, c), rtol=1e-5, atol=1e-5)
    assert shared_cache.full_calls == repeated_cache.full_calls == 2


@torch.no_grad()
def test_deepcache_checks_the_batch_as_the_unet_does(unet):
    x, c = _inputs(0)
    errors = []
    for network in (unet, speed_up(unet, deepcache_interval=2)):
        with pytest.raises(InputError, match="2 samples") as error:
            network(x, 500, c[:1].expand(3, -1, -1))
        errors.append(str(error.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize(
    "timestep",
    [500, 500.0, torch.tensor(500), torch.tensor(500.0), torch.tensor([500.0]), torch.tensor([500, 500])],
    ids=["int", "float", "0-d int", "0-d float", "1-d one", "1-d per sample"],
)
@torch.no_grad()
def test_deepcache_embeds_every_form_of_timestep_as_the_unet_does(unet, timestep):
    x, c = _inputs(0)
    cached = speed_up(unet, deepcache_interval=2)
    assert torch.equal(cached(x, timestep, c), unet(x, timestep, c))  # a full step
    reference = speed_up(unet, deepcache_interval=2)
    reference(x, 500, c)
    assert torch.equal(cached(x, timestep, c), reference(x, 500, c))  # a cached step


@torch.no_grad()
def test_deepcache_per_sample_timesteps_differ_per_row_as_in_the_unet(unet):
    x, c = _inputs(0)
    t = torch.tensor([100, 900])
    got = speed_up(unet, deepcache_interval=2)(x, t, c)
    assert torch.equal(got, unet(x, t, c))
    torch.testing.assert_close(got[1:], unet(x[1:], 900, c[1:]), rtol=1e-5, atol=1e-5)  # row 1 at t = 900


def test_deepcache_rejects_bad_settings(unet):
    with pytest.raises(ConfigError, match="interval"):
        speed_up(unet, deepcache_interval=0)
    with pytest.raises(ConfigError, match="branch"):
        DeepCache(unet, interval=2, branch=4)


def test_merge_then_unmerge_is_lossless_on_constant_windows():
    # Every 2x2 window holds one repeated token: each source has an identical destination, so averaging
    # loses nothing and unmerging restores the input exactly.
    g = torch.Generator().manual_seed(0)
    window = torch.randn(2, 3, 4, 16, generator=g)  # (B, H/2, W/2, C)
    x = window.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(2, 6 * 8, 16)
    merge, unmerge = bipartite_soft_matching(x, (6, 8), 0.75)
    merged = merge(x)
    assert merged.shape == (2, 12, 16)
    torch.testing.assert_close(unmerge(merged), x)


def test_merge_averages_the_most_similar_pairs_only():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, generator=g)  # a 4x4 map; destinations are tokens 0, 2, 8, 10
    x[0, 1] = x[0, 0] * 3.0  # same direction as its destination: cosine similarity 1
    merge, unmerge = bipartite_soft_matching(x, (4, 4), 1 / 16)
    merged = merge(x)
    assert merged.shape == (1, 15, 8)
    torch.testing.assert_close(merged[0, -4], (x[0, 0] + x[0, 1]) / 2)
    restored = unmerge(merged)
    torch.testing.assert_close(restored[0, 1], restored[0, 0])
    keep = [i for i in range(16) if i not in (0, 1)]
    torch.testing.assert_close(restored[0, keep], x[0, keep])


@torch.no_grad()
def test_token_merging_ratio_0_is_exact_and_ratio_half_attends_to_fewer_tokens(unet):
    x, c = _inputs(0)
    exact = unet(x, 500, c)
    assert token_merging_hooks(unet, 0.0) == {}
    first = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    seen: list[int] = []
    handle = first.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        merged = speed_up(unet, token_merging=0.5)(x, 500, c)
    finally:
        handle.remove()
    assert seen == [64 - 32]
    assert not torch.equal(merged, exact)
    assert (merged - exact).abs().max() < 0.1 * exact.abs().max()  # 0.036 of the output's range here (another input: 1.1)


def test_token_merging_hooks_the_full_resolution_levels_only(unet):
    hooks = token_merging_hooks(unet, 0.5)
    full_resolution = (unet.down_blocks[0], unet.up_blocks[-1])
    expected = {t for level in full_resolution for a in level.attentions for t in a.transformer_blocks}
    assert set(hooks) == expected and len(expected) == 2 + 3


def test_token_merging_rejects_bad_settings(unet):
    with pytest.raises(ConfigError, match="ratio"):
        speed_up(unet, token_merging=0.9)
    with pytest.raises(ConfigError, match="levels"):
        token_merging_hooks(unet, 0.5, levels=4)


@torch.no_grad()
def test_token_merging_with_deepcache_merges_on_full_and_cached_steps(unet):
    x, c = _inputs(0)
    both, merged = speed_up(unet, deepcache_interval=2, token_merging=0.5), speed_up(unet, token_merging=0.5)
    assert torch.equal(both(x, 500, c), merged(x, 500, c))  # a full step: token merging alone
    first = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    seen: list[int] = []
    handle = first.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        cached = both(x, 500, c)  # a cached step: merging in the shallow layers it runs
    finally:
        handle.remove()
    assert seen == [64 - 32]
    assert both.hooks.blocks.full_calls == 1
    torch.testing.assert_close(cached, merged(x, 500, c), rtol=0, atol=0)


# --- a speed-up leaves the shared U-Net alone ----------------------------------------------------------------


def _module_state(unet: torch.nn.Module) -> dict:
    """Every attribute of every module: parameters and submodules by identity, hook tables by content."""
    state = {}
    for name, module in unet.named_modules():
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers", "_modules"):
                value = {k: id(v) for k, v in value.items()}
            elif isinstance(value, dict):
                value = dict(value)
            state[name, key] = value
    return state


@torch.no_grad()
def test_speed_up_sets_nothing_on_the_unet(unet):
    before = _module_state(unet)
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    x, c = _inputs(0)
    plain = unet(x, 500, c)
    network = speed_up(unet, deepcache_interval=2, token_merging=0.5)
    assert _module_state(unet) == before
    network(x, 500, c)
    assert torch.equal(unet(x, 500, c), plain)  # while a token-merging network exists and has run
    network(x, 480, c)
    assert _module_state(unet) == before
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())


@torch.no_grad()
def test_concurrent_calls_with_and_without_token_merging_get_their_own_results(unet):
    networks = {"plain": unet, "merged": speed_up(unet, token_merging=0.5)}
    inputs = [_inputs(seed) for seed in range(4)]

    def run(name: str, results: dict, start: threading.Barrier | None = None) -> None:
        if start is not None:
            start.wait()
        results[name] = [networks[name](x, 500, c) for x, c in inputs]

    alone: dict = {}
    for name in networks:  # each in a thread of its own too, so both runs use threads alike
        thread = threading.Thread(target=run, args=(name, alone))
        thread.start()
        thread.join()
    together: dict = {}
    start = threading.Barrier(len(networks))
    threads = [threading.Thread(target=run, args=(name, together, start)) for name in networks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in networks:
        assert all(torch.equal(a, b) for a, b in zip(together[name], alone[name])), name
    assert not torch.equal(alone["plain"][0], alone["merged"][0])


# --- exact-mode kernels: sub-pixel upsampling and the strip-wise VAE decoder ---------------------------------


@pytest.mark.parametrize("shape", [(2, 16, 32, 32), (1, 16, 33, 40)])
def test_subpixel_upsample_equals_nearest_upsample_then_conv(shape):
    from ldm.models.layers import Upsample

    torch.manual_seed(0)
    up = Upsample(16).eval()
    up.kernels = EVERY_PATH
    x = torch.randn(shape)
    expected = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    with torch.no_grad():
        got = up(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class _RecordCalls(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


_LAYOUTS = {
    "contiguous": lambda shape: torch.randn(shape),
    "rows transposed": lambda shape: torch.randn(shape).transpose(0, 1),
    # The VAE attention's tokens: a (B, C, HW) map's transpose, so the features are not contiguous.
    "features transposed": lambda shape: torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2),
}


@pytest.mark.parametrize(
    ("shape", "bias", "layout"),
    [((2, 37, 24), True, "contiguous"), ((5, 24), False, "contiguous"), ((2, 3, 4, 24), True, "rows transposed"),
     ((1, 37, 24), True, "features transposed")],
)  # fmt: skip
def test_cpu_linear_as_a_1x1_convolution_equals_the_linear_layer(shape, bias, layout):
    from ldm.models.attention import Linear

    torch.manual_seed(0)
    layer = Linear(24, 40, bias=bias)
    x = _LAYOUTS[layout](shape)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with torch.inference_mode(), _RecordCalls() as calls:
        plain = layer(x)  # a layer outside a pipeline takes no fast path
        layer.kernels = EVERY_PATH
        got = layer(x)
    assert calls.names[0] == "linear" and calls.names.count("conv2d") == 1 and calls.names.count("linear") == 1
    assert got.shape == expected.shape and got.is_contiguous() and torch.equal(plain, expected)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # bf16 takes it too
        bf16 = copy.deepcopy(layer).to(torch.bfloat16)(x.bfloat16())
    torch.testing.assert_close(bf16.float(), expected, rtol=0.02, atol=0.05)
    with _RecordCalls() as calls:  # with autograd (training) the plain linear layer runs
        assert torch.equal(layer(x), expected)
    assert "conv2d" not in calls.names


def test_the_vae_attention_with_linear_layers_as_convolutions_runs_torch_s_fused_kernel():
    """Its queries, keys and values keep the layout torch's flash-attention kernel takes: without it SDPA falls
    back to holding the whole score matrix (2 GiB for the 16384 pixels of a 1024x1024 image's latent)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldm.models.attention import VAEAttention

    torch.manual_seed(0)
    layer = VAEAttention(64, 8).eval()
    x = torch.randn(1, 64, 16, 16)
    with torch.inference_mode():
        expected = layer(x)
        set_kernels(layer, KernelChoice(linear_as_conv=True))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises where the fused kernel cannot take the inputs
            got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_geglu_without_autograd_computes_its_halves_apart_with_the_formula_s_result():
    from ldm.models.attention import GEGLU

    torch.manual_seed(0)
    geglu = GEGLU(24, 40)
    set_kernels(geglu, EVERY_PATH)
    x = torch.randn(2, 7, 24, requires_grad=True)
    value, gate = torch.nn.functional.linear(x, geglu.proj.weight, geglu.proj.bias).chunk(2, dim=-1)
    expected = value * torch.nn.functional.gelu(gate)  # Shazeer 2020, eq. 5
    with torch.inference_mode(), _RecordCalls() as calls:
        got = geglu(x.detach())
    assert calls.names.count("conv2d") == 2 and got.shape == (2, 7, 40)  # the gate's and the value's half
    torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-6)
    trained = geglu(x)  # with autograd: one product, and gradients through it
    torch.testing.assert_close(trained, expected, rtol=1e-6, atol=1e-6)
    grad_got, grad_expected = (torch.autograd.grad(y.square().sum(), x)[0] for y in (trained, expected))
    torch.testing.assert_close(grad_got, grad_expected)


@pytest.mark.parametrize(
    ("heads", "width", "queries", "keys", "chunks", "transposed"),
    # head widths 40 (padded to 48), 64 and 16; transposed: (B, C, N) storage viewed as (B, N, C), as in the VAE
    [(2, 80, 100, 100, 4, False), (1, 64, 50, 90, 2, True), (3, 48, 64, 64, 3, False), (3, 48, 64, 64, 3, True)],
)
def test_cpu_long_attention_as_convolutions_equals_the_formula(
    monkeypatch, heads, width, queries, keys, chunks, transposed
):
    import ldm.kernels.attention as conv_attention
    from ldm.models.attention import _attend

    layer = SimpleNamespace(backend="sdpa", kernels=EVERY_PATH, slice_size=0)

    # Small sizes stand in for 4096 tokens: at most 30 query rows' scores per chunk, at least 16 rows.
    monkeypatch.setattr(conv_attention, "CONV_ATTENTION_SCORES", 30 * keys)
    monkeypatch.setattr(conv_attention, "CONV_ATTENTION_MIN_ROWS", 16)
    torch.manual_seed(0)
    if transposed:
        q, k, v = (torch.randn(2, width, n).transpose(1, 2) for n in (queries, keys, keys))
    else:
        q, k, v = torch.randn(2, queries, width), torch.randn(2, keys, width), torch.randn(2, keys, width)
    d = width // heads
    q_, k_, v_ = (t.double().reshape(2, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
    probs = torch.softmax(q_ @ k_.transpose(-1, -2) / d**0.5, dim=-1)  # Vaswani et al. 2017, eq. 1
    expected = (probs @ v_).transpose(1, 2).reshape(2, queries, width)
    with torch.inference_mode(), _RecordCalls() as calls:
        got = _attend(layer, q, k, v, heads, False)
    assert "scaled_dot_product_attention" not in calls.names
    assert calls.names.count("conv2d") == 2 * 2 * heads * chunks  # Q K^T and P V per sample, head and chunk
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # The fused kernel runs with autograd, for fp32 scores of bf16 inputs (upcast), for few keys, for more keys
    # than a chunk holds, and where the layer's choice does not take the path.
    cases = [(q, k, v, True, True, EVERY_PATH), (q.bfloat16(), k.bfloat16(), v.bfloat16(), False, True, EVERY_PATH)]
    cases += [(q, k[:, :15], v[:, :15], False, False, EVERY_PATH), (q, k, v, False, False, KernelChoice())]
    cases.append((q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1), False, False, EVERY_PATH))  # 30 * keys / (keys + 1) < 30
    for q_, k_, v_, grad, upcast, kernels in cases:
        monkeypatch.setattr(conv_attention, "CONV_ATTENTION_MIN_ROWS", 30 if q_ is q and k_.shape[1] > keys else 16)
        with torch.set_grad_enabled(grad), _RecordCalls() as calls:
            _attend(SimpleNamespace(backend="sdpa", kernels=kernels, slice_size=0), q_, k_, v_, heads, upcast)
        assert "scaled_dot_product_attention" in calls.names and "conv2d" not in calls.names
    # The chunks' softmax runs in place; torch's CPU kernel gives the same bits as out of place.
    scores = torch.randn(64, 300) * 10
    out_of_place = torch.softmax(scores, -1)
    assert torch.equal(torch._softmax(scores, -1, False, out=scores), out_of_place)


@pytest.mark.parametrize(
    ("channels", "side", "stride", "bias", "sliced"),
    [(700, 8, 1, True, True), (700, 64, 2, False, True), (700, 33, 1, True, False), (320, 8, 1, True, False)],
)
def test_small_map_convolution_in_output_channel_slices_equals_the_convolution(channels, side, stride, bias, sliced):
    from ldm.kernels.conv import SLICED_CONV_CHANNELS, SLICED_CONV_MAX_PIXELS
    from ldm.models.layers import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(16, channels, 3, stride=stride, padding=1, bias=bias)
    conv.kernels = EVERY_PATH
    x = torch.randn(2, 16, side, side)
    expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride, 1)
    with torch.inference_mode(), _RecordCalls() as calls:
        got = conv(x)
    small = got.shape[-2] * got.shape[-1] <= SLICED_CONV_MAX_PIXELS
    assert (small and channels > SLICED_CONV_CHANNELS) == sliced
    assert calls.names.count("conv2d") == (-(-channels // SLICED_CONV_CHANNELS) if sliced else 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with _RecordCalls() as calls:  # with autograd (training) one plain convolution runs
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    assert calls.names.count("conv2d") == 1


@pytest.mark.parametrize("strip_pixels", [2**14, 300, 50])
def test_strip_wise_decode_equals_the_plain_decoder(monkeypatch, strip_pixels):
    import ldm.models.vae_strips as vae_module
    from ldm.models import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny()).eval().requires_grad_(False)
    z = torch.randn(1, 4, 9, 7)
    with torch.enable_grad():  # autograd on: the plain layer-by-layer path
        expected = vae.decode(z)
    monkeypatch.setattr(vae_module, "STRIP_PIXELS", strip_pixels)  # many strips of a few rows
    with torch.inference_mode():
        got = vae.decode(z)
    assert ((got - expected).norm() / expected.norm()) < 1e-5
