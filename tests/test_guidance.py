"""Classifier-free guidance as a denoiser wrapper (ldm/guidance.py), on a network whose output is known."""

from __future__ import annotations

import torch

from ldm.guidance import ClassifierFreeGuidance, Conditional, Conditioning, guided_steps, rescale_guidance


def network(calls: list[int]):
    """f(x, t, text) = x * t + text row mean, broadcast over x's rows (the U-Net repeats x for 2 text rows)."""

    def f(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        calls.append(text.shape[0])
        rows = text.shape[0] // x.shape[0]
        return x.repeat(rows, 1, 1, 1) * t + text.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    return f


def test_guidance_mixes_the_two_passes_of_one_call_for_the_first_steps_only():
    calls: list[int] = []
    cond, uncond = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -1.0)
    x, t = torch.randn(2, 4, 5, 5), torch.tensor(3.0)
    denoiser = ClassifierFreeGuidance(network(calls), Conditioning.fixed(cond, uncond), scale=7.5, rescale=0.0, guided_steps=2)
    expected_guided = x * 3 + (-1.0 + 7.5 * (2.0 - -1.0))  # eq. 6 of Ho & Salimans 2022
    assert torch.allclose(denoiser(x, t), expected_guided) and torch.allclose(denoiser(x, t), expected_guided)
    assert torch.allclose(denoiser(x, t), x * 3 + 2.0)  # after the window: the conditional pass alone
    assert calls == [4, 4, 2]  # both passes in one network call, then one pass


def scaling(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """f(x, t, text) = x * (text row mean): the passes differ in scale, so rescaling changes the output."""
    return x.repeat(text.shape[0] // x.shape[0], 1, 1, 1) * text.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_guidance_rescale_is_applied_to_the_guided_output():
    cond, uncond = torch.full((1, 3, 4), 2.0), torch.full((1, 3, 4), 1.0)
    x, t = torch.randn(1, 4, 5, 5), torch.tensor(0.5)
    plain = ClassifierFreeGuidance(scaling, Conditioning.fixed(cond, uncond), 5.0, 0.0, 1)(x, t)
    rescaled = ClassifierFreeGuidance(scaling, Conditioning.fixed(cond, uncond), 5.0, 0.7, 1)(x, t)
    out_cond = x * 2.0
    assert torch.allclose(plain, x * 6.0)
    assert torch.allclose(rescaled, rescale_guidance(plain, out_cond, 0.7))
    assert not torch.allclose(rescaled, plain)


def test_without_guidance_the_conditional_pass_runs_alone():
    calls: list[int] = []
    cond = torch.full((2, 3, 4), 2.0)
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(Conditional(network(calls), Conditioning.fixed(cond))(x, torch.tensor(1.0)), x + 2.0) and calls == [2]


def test_the_guidance_window_rounds_up():
    assert [guided_steps(f, 10) for f in (0.0, 0.01, 0.5, 0.55, 1.0)] == [0, 1, 5, 6, 10]
