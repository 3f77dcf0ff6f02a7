"""benchmarks/gpu_check.py: the whole check where CUDA is present, its pieces on the CPU everywhere."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_check  # noqa: E402


def test_the_precision_difference_is_measured_on_both_families():
    """The fp16 check's function, run in bf16 on the CPU: small but not zero, on SD 1.x and 2.x."""
    for family in ("sd1", "sd2"):
        difference = gpu_check.image_difference(torch.device("cpu"), torch.bfloat16, family)
        assert 0 < difference < 0.1, family


def test_without_cuda_the_check_says_it_measured_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--quick"]) == {"skipped": "no CUDA device: the GPU figures are not measured on this machine"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: runs as benchmarks/gpu_check.py on one")
def test_the_gpu_check_on_a_gpu():
    result = gpu_check.main(["--quick"])
    assert all(0 < d < 0.05 for d in result["fp16_vs_fp32"].values())
    assert set(result["recipes"]) == {f"{r}, batch {b}" for r in gpu_check.RECIPES for b in (1, 4)}
    assert all(math.isfinite(r["seconds_per_image"]) for r in result["recipes"].values())
    assert result["vae_overflow"]["finite"]
