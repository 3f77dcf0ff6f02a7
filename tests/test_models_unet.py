"""Our U-Net against diffusers' UNet2DConditionModel on the same random weights (CPU, fp32)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import diffusers_unet

from ldm.errors import ConfigError, InputError
from ldm.models import UNet, UNetConfig
from ldm.models.layers import ResnetBlock


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _pair(family: str) -> tuple[torch.nn.Module, UNet]:
    ref = diffusers_unet(family)
    ours = UNet(UNetConfig.from_diffusers(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(config: UNetConfig, batch: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, config.in_channels, size, size, generator=g)
    context = torch.randn(batch, 77, config.cross_attention_dim, generator=g)
    return sample, torch.tensor([999, 17][:batch]), context


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_matches_diffusers(family):
    ref, ours = _pair(family)
    sample, t, context = _inputs(ours.config)
    with torch.no_grad():
        expected = ref(sample, t, context).sample
        got = ours(sample, t, context)
    assert got.shape == expected.shape == sample.shape
    assert _rel(got, expected) < 1e-5


def test_unet_matches_diffusers_on_odd_latent_size():
    # 10 -> 5 -> 3: the up path must upsample to the skip's size, not simply 2x.
    ref, ours = _pair("sd1")
    sample, t, context = _inputs(ours.config, size=10)
    with torch.no_grad():
        assert _rel(ours(sample, t, context), ref(sample, t, context).sample) < 1e-5


def test_scalar_timestep_broadcasts_over_the_batch():
    _, ours = _pair("sd1")
    sample, _, context = _inputs(ours.config)
    with torch.no_grad():
        a = ours(sample, 500, context)
        b = ours(sample, torch.tensor(500), context)
        c = ours(sample, torch.tensor([500, 500]), context)
        e = ours(sample, torch.tensor([500.0]), context)
        d = ours(sample, torch.tensor([500, 20]), context)
    assert torch.equal(a, b) and torch.equal(b, c) and torch.equal(c, e)
    assert not torch.allclose(c[1], d[1])


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_sample_shared_by_several_text_embeddings_equals_the_repeated_sample(family):
    _, ours = _pair(family)
    sample, t, _ = _inputs(ours.config)  # two samples, one timestep each
    context = torch.randn(6, 77, ours.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    first = ours.down_blocks[0]
    seen = {"resnet": [], "self": [], "cross": []}
    for name, module in (("resnet", first.resnets[0]), ("self", first.attentions[0].transformer_blocks[0].attn1),
                         ("cross", first.attentions[0].transformer_blocks[0].attn2)):  # fmt: skip
        module.register_forward_pre_hook(lambda _, args, name=name: seen[name].append(args[0].shape[0]))
    with torch.no_grad():
        shared = ours(sample, t, context)
        repeated = ours(torch.cat([sample] * 3), t.repeat(3), context)
    assert shared.shape == (6, *sample.shape[1:])
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)
    # The layers before the text runs once per sample; the cross-attention once per embedding.
    assert seen == {"resnet": [2, 6], "self": [2, 6], "cross": [6, 6]}


def test_text_embeddings_not_a_multiple_of_the_samples_are_an_input_error():
    _, ours = _pair("sd1")
    sample, t, context = _inputs(ours.config)
    with pytest.raises(InputError, match="2 samples"):
        ours(sample, t, torch.cat([context, context[:1]]))


def test_hooks_that_do_what_the_unet_does_give_its_output_and_see_every_block():
    from ldm.models.attention import BasicTransformerBlock
    from ldm.models.unet import UNetHooks

    _, ours = _pair("sd1")
    sample, t, context = _inputs(ours.config)
    blocks = [m for m in ours.modules() if isinstance(m, BasicTransformerBlock)]
    seen: list[tuple[int, tuple[int, int]]] = []
    loops: list[int] = []

    def self_attention(hidden, size, attend):
        seen.append((hidden.shape[1], size))
        return attend(hidden)

    def run_blocks(x, temb, context, skips, hooks):
        loops.append(len(skips))
        return ours.run_blocks(x, temb, context, skips, hooks)

    hooks = UNetHooks(self_attention={block: self_attention for block in blocks}, blocks=run_blocks)
    with torch.no_grad():
        assert torch.equal(ours(sample, t, context, hooks=hooks), ours(sample, t, context))
    assert loops == [1]  # called once, with conv_in's output as the first skip
    # 8x8 latents, transformers at levels 0 and 1 and in the middle: down 8x8 and 4x4 (two each), the
    # middle at 2x2, up 4x4 and 8x8 (three each).
    assert [size for _, size in seen] == [(8, 8)] * 2 + [(4, 4)] * 2 + [(2, 2)] + [(4, 4)] * 3 + [(8, 8)] * 3
    assert all(n == h * w for n, (h, w) in seen)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_attention_backends_give_the_same_output(family):
    _, ours = _pair(family)
    sample, t, context = _inputs(ours.config)
    with torch.no_grad():
        expected = ours(sample, t, context)
        ours.set_attention("sliced", slice_size=5)  # uneven chunks of the 64 / 16 query rows
        sliced = ours(sample, t, context)
        ours.set_attention("sdpa")
        again = ours(sample, t, context)
    assert _rel(sliced, expected) < 1e-5
    assert torch.equal(again, expected)


def test_xformers_backend_without_the_package_is_a_config_error():
    _, ours = _pair("sd1")
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ConfigError, match="xformers"):
            ours.set_attention("xformers")
    else:
        sample, t, context = _inputs(ours.config)
        with torch.no_grad():
            expected = ours(sample, t, context)
            ours.set_attention("xformers")
            assert _rel(ours(sample, t, context), expected) < 1e-5


def test_bad_attention_settings_are_config_errors():
    _, ours = _pair("sd1")
    with pytest.raises(ConfigError, match="flash"):
        ours.set_attention("flash")
    with pytest.raises(ConfigError, match="slice_size"):
        ours.set_attention("sdpa", slice_size=4)
    with pytest.raises(ConfigError, match="slice_size"):
        ours.set_attention("sliced", slice_size=0)


def test_meta_construction_then_assign_loading_gives_the_same_output():
    ref, _ = _pair("sd2")
    with torch.device("meta"):
        ours = UNet(UNetConfig.from_diffusers(ref.config))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval()
    assert all(p.device.type == "cpu" for p in ours.parameters())
    sample, t, context = _inputs(ours.config)
    with torch.no_grad():
        assert _rel(ours(sample, t, context), ref(sample, t, context).sample) < 1e-5


def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes():
    _, ours = _pair("sd1")
    ours.train()
    sample, t, context = _inputs(ours.config)
    calls = []
    first_resnet = next(m for m in ours.modules() if isinstance(m, ResnetBlock))
    # Forward hooks are skipped in checkpoint recomputation; pre-hooks are not.
    first_resnet.register_forward_pre_hook(lambda *_: calls.append(1))

    def grads() -> dict[str, torch.Tensor]:
        ours.zero_grad()
        calls.clear()
        ours(sample, t, context).square().mean().backward()
        return {name: p.grad.clone() for name, p in ours.named_parameters()}

    plain = grads()
    assert len(calls) == 1
    ours.enable_gradient_checkpointing()
    checkpointed = grads()
    assert len(calls) == 2  # forward, then recomputed in backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)

    ours.eval()  # inactive outside training mode
    calls.clear()
    ours(sample, t, context).sum().backward()
    assert len(calls) == 1
    ours.enable_gradient_checkpointing(False)
    ours.train()
    grads()
    assert len(calls) == 1


def test_bf16_forward_stays_close_to_fp32():
    _, ours = _pair("sd2")  # upcast_attention=True: the attention scores run in fp32
    sample, t, context = _inputs(ours.config, batch=1)
    with torch.no_grad():
        expected = ours(sample, t, context)
        ours.to(torch.bfloat16)
        got = ours(sample.bfloat16(), t, context.bfloat16())
    assert got.dtype == torch.bfloat16
    assert _rel(got, expected) < 3e-2  # measured 0.012
