"""Which exact fast paths run on the CPU at hand: measured once per CPU, torch version, thread count and dtype.

Each fast path of this package computes what the plain torch call computes, by another route. Which route
is faster depends on the CPU, not only on its family: MKL's GEMM runs AVX2 code on AMD CPUs and AVX-512 on
Intel ones, oneDNN has AMX kernels for bf16, and torch's fused attention beat the convolution form by 2x on
one AMD EPYC and lost to it on another; channels-last made oneDNN's bf16 convolutions several times faster
on an AMX CPU, and on an AVX512_BF16 one changed nothing at the U-Net's shapes (converting its weights then
only slows the load) while the VAE's ran faster. So the choice is measured, not assumed: the first pipeline
on a CPU times both routes of every path on Stable Diffusion 1.5's shapes at 512x512 (``measure``, a few
seconds), takes a fast path where it is clearly faster (``choose``), and keeps the choice with its timings
in ``kernels.json`` in ldm's cache folder (``kernel_choice``). Delete that file to measure again, e.g. after
moving a disk to another machine; a VM that hides CPU flags gets its own entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.cache import cache_folder, read_entries, write_entries
from ldm.kernels import attention, conv, linear
from ldm.kernels.cpu import bf16_slowdown, this_cpu

CACHE_FILE = "kernels.json"
FASTER = 0.95  # a fast path is taken where it measured at most this fraction of the plain route's time
ROUNDS = 3  # timed rounds per route, after one warm-up; the best counts (other processes only slow a round)


@dataclass(frozen=True)
class KernelChoice:
    """The fast paths a network's layers take on the CPU without autograd (see ``ldm.kernels``)."""

    linear_as_conv: bool = False  # linear layers as oneDNN 1x1 convolutions (``linear``)
    attention_as_conv: bool = False  # long self-attention as two 1x1 convolutions per head (``attention``)
    sliced_conv: bool = False  # small-map convolutions in output-channel slices (``conv``)
    subpixel_upsample: bool = False  # nearest-2x upsampling + 3x3 convolution as sub-pixel convolutions (``conv``)
    # The U-Net's and the VAE's maps and weights in channels-last (NHWC) memory format, each measured on its own
    # network's shapes; a pipeline whose ``channels_last`` is None follows them. Measured in bf16 only: fp32
    # stays NCHW (a whole SD 1.5 step measured slower in NHWC).
    unet_channels_last: bool = False
    vae_channels_last: bool = False


PLAIN = KernelChoice()  # torch's own calls: on GPUs, with autograd, and for networks used outside a pipeline

Route = Callable[[], object]


def kernel_choice(device: torch.device, dtype: torch.dtype, cache: Path | None = None) -> KernelChoice:
    """The fast paths for networks in ``dtype`` on ``device``: measured on the first call for this CPU, then read
    from ``cache`` (default: ldm's cache folder). Off the CPU, and in dtypes without fast paths, ``PLAIN``."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return PLAIN
    file = (cache or cache_folder()) / CACHE_FILE
    key = f"{_machine()} | {dtype}"
    entries = read_entries(file)
    known = entries.get(key, {}).get("choice") if isinstance(entries.get(key), dict) else None
    names = {f.name for f in fields(KernelChoice)}
    if isinstance(known, dict) and set(known) == names and all(isinstance(v, bool) for v in known.values()):
        return KernelChoice(**known)
    seconds = measure(dtype)
    choice = choose(seconds)
    write_entries(file, {**entries, key: {"choice": asdict(choice), "seconds": seconds}})
    return choice


def bf16_warning(device: torch.device, dtype: torch.dtype, cache: Path | None = None) -> str | None:
    """For bf16 on a CPU that has no native bf16 (it then runs bf16 products through fp32 and conversions):
    the warning to show, with the slowdown of a bf16 matrix product against fp32 measured once on this CPU."""
    cpu = this_cpu()
    if device.type != "cpu" or dtype != torch.bfloat16 or cpu.native_bf16:
        return None
    file = (cache or cache_folder()) / CACHE_FILE
    key = f"{_machine()} | bf16 slowdown"
    entries = read_entries(file)
    slowdown = entries.get(key)
    if not isinstance(slowdown, float):
        slowdown = bf16_slowdown()
        write_entries(file, {**entries, key: slowdown})
    return (
        f"this CPU ({cpu.model}) has no native bf16 (AVX512_BF16, AMX or Arm BF16): a bf16 matrix product took "
        f"{slowdown:.1f}x the time of fp32 here; use fp32 (--dtype fp32) for speed"
    )


def _machine() -> str:
    """What a measurement here depends on: the CPU (model and flags), torch's version and its thread count."""
    return f"{this_cpu().key} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def choose(seconds: dict[str, tuple[float, float]]) -> KernelChoice:
    """Each path on where its fast route took at most ``FASTER`` of the plain route's time; ``seconds`` maps each
    ``KernelChoice`` field to (plain, fast) seconds."""
    return KernelChoice(**{name: fast <= FASTER * plain for name, (plain, fast) in seconds.items()})


def measure(dtype: torch.dtype) -> dict[str, tuple[float, float]]:
    """(plain, fast) seconds of each path's two routes on SD 1.5's shapes at 512x512, in ``dtype``, without autograd;
    the routes alternate, and each keeps its best of ``ROUNDS``. In bf16 the memory formats are measured first,
    and the convolution paths are then measured in the U-Net's."""
    with torch.inference_mode():
        seconds = {}
        if dtype == torch.bfloat16:
            seconds = _best(_timed({name: layout_routes(dtype, shapes) for name, shapes in LAYOUT_SHAPES.items()}))
        layout = torch.channels_last if choose(seconds).unet_channels_last else torch.contiguous_format
        return {**seconds, **_best(_timed(routes(dtype, layout)))}


def _best(times: dict[str, tuple[list[float], list[float]]]) -> dict[str, tuple[float, float]]:
    return {name: (min(plain), min(fast)) for name, (plain, fast) in times.items()}


def _seeded(dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """``randn(*shape)``: normal samples in ``dtype``, the same sequence on every CPU."""
    generator = torch.Generator().manual_seed(0)
    return lambda *shape: torch.randn(*shape, generator=generator).to(dtype)


def routes(dtype: torch.dtype, layout: torch.memory_format = torch.contiguous_format) -> dict[str, tuple[Route, Route]]:
    """The (plain, fast) routes of each path on SD 1.5's shapes, on seeded inputs in ``dtype`` (the convolutions'
    maps in ``layout``); call without autograd. Both routes of a path return the same result (to rounding)."""
    randn = _seeded(dtype)
    return {
        "linear_as_conv": _linear_routes(randn),
        "attention_as_conv": _attention_routes(randn),
        "sliced_conv": _sliced_conv_routes(randn, layout),
        "subpixel_upsample": _upsample_routes(randn, layout),
    }


# (channels, height, width) of the maps on which each network's memory format is measured: SD 1.5's U-Net
# levels at 512x512, and three VAE decoder levels (512, 256 and 128 channels) of equal multiplications.
LAYOUT_SHAPES = {
    "unet_channels_last": ((320, 64, 64), (640, 32, 32), (1280, 16, 16)),
    "vae_channels_last": ((512, 32, 64), (256, 64, 128), (128, 128, 256)),
}


def layout_routes(dtype: torch.dtype, shapes: tuple[tuple[int, int, int], ...]) -> tuple[Route, Route]:
    """The second half of a ResNet block (GroupNorm, SiLU, 3x3 conv) on maps of ``shapes``, with maps and weights
    in NCHW (plain) and in channels-last (fast)."""
    randn = _seeded(dtype)
    cases = [(randn(1, c, h, w), randn(c), randn(c), randn(c, c, 3, 3)) for c, h, w in shapes]

    def in_layout(layout: torch.memory_format) -> Route:
        laid = [(x.contiguous(memory_format=layout), g, b, w.contiguous(memory_format=layout)) for x, g, b, w in cases]
        return lambda: [F.conv2d(F.silu(F.group_norm(x, 32, g, b)), w, None, 1, 1) for x, g, b, w in laid]

    return in_layout(torch.contiguous_format), in_layout(torch.channels_last)


def _timed(pairs: dict[str, tuple[Route, Route]]) -> dict[str, tuple[list[float], list[float]]]:
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pairs}
    for round_ in range(ROUNDS + 1):
        for name, pair in pairs.items():
            for route, kept in zip(pair, times[name]):
                start = time.perf_counter()
                route()
                if round_:  # the first round warms caches and oneDNN's kernel selection
                    kept.append(time.perf_counter() - start)
    return times


def _linear_routes(randn) -> tuple[Route, Route]:
    """The feed-forward's input half and an attention projection of the 64x64 level, a projection at 32x32."""
    cases = [(randn(4096, 320), randn(1280, 320), randn(1280)), (randn(1024, 640), randn(640, 640), None)]
    return (
        lambda: [F.linear(x, w, b) for x, w, b in cases],
        lambda: [linear.linear_as_conv(x, w, b) for x, w, b in cases],
    )


def _attention_routes(randn) -> tuple[Route, Route]:
    """Self-attention at 4096 tokens, 8 heads of 40 (the 64x64 level)."""
    q, k, v = randn(1, 4096, 320), randn(1, 4096, 320), randn(1, 4096, 320)
    rows = attention.conv_attention_rows(q, k)

    def fused() -> torch.Tensor:
        heads = [t.view(1, -1, 8, 40).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(1, -1, 320)

    return fused, lambda: attention.attention_as_convolutions(q, k, v, 8, rows)


def _sliced_conv_routes(randn, layout: torch.memory_format) -> tuple[Route, Route]:
    """The 1280-channel 3x3 convolutions of the 8x8 and 16x16 levels."""
    cases = [(randn(1, 1280, side, side).contiguous(memory_format=layout), randn(1280, 1280, 3, 3)) for side in (8, 16)]
    return (
        lambda: [F.conv2d(x, w, None, 1, 1) for x, w in cases],
        lambda: [conv.conv2d_in_slices(x, w, None, (1, 1), (1, 1)) for x, w in cases],
    )


def _upsample_routes(randn, layout: torch.memory_format) -> tuple[Route, Route]:
    """The last upsampler of the U-Net: 640 channels, 32x32 to 64x64."""
    x = randn(1, 640, 32, 32).contiguous(memory_format=layout)
    weight, bias = randn(640, 640, 3, 3), randn(640)
    return (
        lambda: F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, 1, 1),
        lambda: conv.upsample_conv(x, weight, bias),
    )

