"""The VAE decoder's up path in row strips, for inference: the same function in a fraction of the memory.

Plainly, a ResNet block holds its input, a normalized copy, an activated copy and the
convolution's output at once, and an upsampler holds the 2x-upsampled copy and its
convolution's output: at 512x512 pixels each is a 128-256 MiB tensor. Here:

- every map is held as horizontal bands of rows (``Bands``), and a band is freed as soon as
  the last strip that reads it is done, so a layer's input shrinks while its output grows;
- every GroupNorm-SiLU-conv runs strip by strip, with the GroupNorm statistics of the whole
  map (Wu & He 2018, eq. 1), the activation written straight into the strip that the
  convolution reads (no normalized copy of the map); the statistics are gathered band by
  band while each band is made (``Moments``), not in passes over the finished map;
- the second convolution of a ResNet block adds into its shortcut's rows in place;
- a ResNet block with a 1x1 shortcut computes the shortcut in the same pass as its first
  convolution, so its input can be freed before the second convolution runs;
- the 2x nearest upsampler and its 3x3 conv run as four 2x2 sub-pixel convolutions of the
  source strip (``subpixel_kernels``): the upsampled map is never built.

Maps stay NCHW: channels-last strips made the convolutions faster but the elementwise work
(normalization, moments, sub-pixel interleave) slower, a net loss measured at 512x512. The largest 512x512 step thus holds two 128-channel full-resolution maps (a
block's input, kept for its residual, and its first convolution's output) plus a strip or
two, where the plain path holds up to four. The result equals the plain path's to float
rounding (tests/test_models_vae_strips.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ldm.kernels.conv import subpixel_kernels
from ldm.models.layers import ResnetBlock

STRIP_PIXELS = 2**14  # pixels per strip (8 MiB at 128 channels, 32 rows at 512 wide): full-speed convs
MIN_STRIP_ROWS = 2


class Moments:
    """Per-group count, mean and sum of squared deviations of a map, merged band by band.

    Each band's mean and sum of squared deviations come from two passes over the band while it
    is fresh in the cache (mean first, then the squares about it), and the bands are merged with
    Chan et al.'s pairwise update (1979, "Updating formulae and a pairwise algorithm for computing
    sample variances", eq. 2.1) in float64. The GroupNorm they give is at least as close to the
    exact one as torch's float32 ``group_norm`` of the whole map (tested).
    """

    def __init__(self, batch: int, groups: int, device: torch.device):
        self.groups = groups
        self.count = 0
        self.mean = torch.zeros(batch, groups, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(batch, groups, dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor) -> None:
        """Merge in rows (B, C, r, W). Two plain reductions: torch's one-pass ``var_mean`` (Welford's
        update per element) is many times slower on the CPU, a large part of a 512x512 decode."""
        c = rows.shape[1]
        per_group = rows.unflatten(1, (self.groups, c // self.groups))  # a view, also of a band's rows
        mean = per_group.mean(dim=(2, 3, 4), keepdim=True)
        m2 = (per_group - mean).square_().sum(dim=(2, 3, 4))  # a band-sized temporary, freed at once
        self._merge(per_group[0, 0].numel(), mean.flatten(1).double(), m2.double())

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.square() * (self.count * n / total)
        self.count = total

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance) per (batch, group), as GroupNorm uses them."""
        return self.mean, self.m2 / self.count


class Bands:
    """A (B, C, H, W) map held as row bands, each dropped by ``release_above`` once no longer read."""

    def __init__(self, like: torch.Tensor, channels: int, height: int, width: int):
        self.shape = (like.shape[0], channels, height, width)
        self.dtype, self.device = like.dtype, like.device
        self._moments: Moments | None = None  # of every band appended after ``track_moments``
        self._bands: list[torch.Tensor | None] = []
        self._starts: list[int] = []
        self.filled = 0  # rows appended so far

    @classmethod
    def whole(cls, x: torch.Tensor) -> Bands:
        bands = cls(x, x.shape[1], x.shape[2], x.shape[3])
        bands.append(x.contiguous())
        return bands

    def track_moments(self, groups: int) -> Bands:
        """Accumulate GroupNorm moments over ``groups`` as bands are appended (before the first one)."""
        self._moments = Moments(self.shape[0], groups, self.device)
        return self

    def moments(self, groups: int) -> Moments:
        """The map's per-group moments: tracked while it was built, or computed now."""
        if self._moments is not None and self._moments.groups == groups and self._moments.count:
            return self._moments
        moments = Moments(self.shape[0], groups, self.device)
        for _, rows in self.pieces(0, self.shape[2]):
            moments.add(rows)
        return moments

    def append(self, rows: torch.Tensor) -> None:
        if self._moments is not None:
            self._moments.add(rows)
        self._starts.append(self.filled)
        self._bands.append(rows)
        self.filled += rows.shape[2]

    def pieces(self, lo: int, hi: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) of every band part inside rows [lo, hi), top to bottom."""
        for start, band in zip(self._starts, self._bands):
            if band is None or start >= hi or start + band.shape[2] <= lo:
                continue
            a, b = max(lo - start, 0), min(hi - start, band.shape[2])
            yield start + a, band[:, :, a:b]

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) as one tensor: a view when they lie in one band, else a copy."""
        parts = [rows for _, rows in self.pieces(lo, hi)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def release_above(self, row: int) -> None:
        """Drop every band that lies wholly above ``row``."""
        for i, (start, band) in enumerate(zip(self._starts, self._bands)):
            if band is not None and start + band.shape[2] <= row:
                self._bands[i] = None

    def release_read(self, bottom: int) -> None:
        """Output rows above ``bottom`` are made: drop the bands no later strip reads (a 3x3 conv's
        next strip still reads row ``bottom - 1``; after the last strip nothing is read)."""
        self.release_above(bottom - 1 if bottom < self.shape[2] else bottom)

    def new(self, channels: int, height: int | None = None, width: int | None = None, groups: int | None = None) -> Bands:
        """An empty map of the same batch, dtype and device (tracking GroupNorm moments over ``groups``)."""
        like = torch.empty(self.shape[0], 0, device=self.device, dtype=self.dtype)
        out = Bands(like, channels, height or self.shape[2], width or self.shape[3])
        return out if groups is None else out.track_moments(groups)

    def empty_rows(self, channels: int, rows: int, width: int | None = None) -> torch.Tensor:
        shape = (self.shape[0], channels, rows, width or self.shape[3])
        return torch.empty(shape, device=self.device, dtype=self.dtype)

    def tensor(self) -> torch.Tensor:
        return self.rows(0, self.shape[2]).contiguous()


def strip_rows(x: Bands) -> int:
    """Rows per strip: a fixed number of pixels, so every map of one resolution is cut at the same rows
    and a strip of one map is a band (or part of one) of another (``Bands.rows`` is then a view)."""
    b, _, _, w = x.shape
    return max(MIN_STRIP_ROWS, STRIP_PIXELS // (b * w))


def strips(height: int, step: int) -> Iterator[tuple[int, int]]:
    for top in range(0, height, step):
        yield top, min(top + step, height)


def group_stats(norm: nn.GroupNorm, x: Bands) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with GroupNorm(x) = x * scale + shift, as torch's own kernel folds it.

    Mean and variance come from x's per-band moments, merged exactly (``Moments``).
    """
    b, c = x.shape[:2]
    g = norm.num_groups
    mean, var = x.moments(g).mean_var()
    rstd = (var.to(x.dtype) + norm.eps).rsqrt().repeat_interleave(c // g, dim=1)  # (B, C)
    scale = rstd * norm.weight
    shift = norm.bias - mean.to(x.dtype).repeat_interleave(c // g, dim=1) * scale
    return scale[..., None, None], shift[..., None, None]


class Activated:
    """SiLU(GroupNorm(x)) of x's strips, with the statistics of the whole map."""

    def __init__(self, norm: nn.GroupNorm, x: Bands):
        self.x = x
        self.stats = group_stats(norm, x)

    def strip(self, top: int, bottom: int) -> torch.Tensor:
        return activated_strip(self.x, top, bottom, self.stats)


def activated_strip(x: Bands, top: int, bottom: int, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """SiLU(GroupNorm(x)) on rows [top - 1, bottom + 1), with zero rows beyond the image's edges.

    That is exactly what a 3x3, padding-1 conv reads to make output rows [top, bottom); so the
    strip is convolved with row padding 0 and gives those rows, contiguous, with nothing cropped.
    """
    scale, shift = stats
    height = x.shape[2]
    strip = x.empty_rows(x.shape[1], bottom - top + 2)
    if top == 0:
        strip[:, :, 0].zero_()
    if bottom == height:
        strip[:, :, -1].zero_()
    for first, rows in x.pieces(max(top - 1, 0), min(bottom + 1, height)):
        at = first - (top - 1)
        torch.addcmul(shift, rows, scale, out=strip[:, :, at : at + rows.shape[2]])
    return F.silu(strip, inplace=True)


def conv3x3_rows(conv: nn.Conv2d, strip: torch.Tensor) -> torch.Tensor:
    return F.conv2d(strip, conv.weight, conv.bias, padding=(0, 1))


def resnet(block: ResnetBlock, x: Bands, groups: int) -> Bands:
    """``block(x)``: conv1 (and the 1x1 shortcut) strip by strip, then conv2 plus the shortcut.

    The output tracks GroupNorm moments over ``groups`` for the next layer.
    """
    b, _, height, width = x.shape
    co = block.conv1.out_channels
    activated = Activated(block.norm1, x)
    h = x.new(co, groups=block.norm2.num_groups)
    shortcut = x if block.conv_shortcut is None else x.new(co)
    for top, bottom in strips(height, strip_rows(x)):
        h.append(conv3x3_rows(block.conv1, activated.strip(top, bottom)))
        if block.conv_shortcut is not None:
            shortcut.append(block.conv_shortcut(x.rows(top, bottom)))
            x.release_read(bottom)
    activated = Activated(block.norm2, h)
    out = x.new(co, groups=groups)
    for top, bottom in strips(height, strip_rows(h)):
        rows = conv3x3_rows(block.conv2, activated.strip(top, bottom))
        # The shortcut's rows become the output's (in place: the identity shortcut is x itself, whose
        # rows nothing reads any more), so no new map is allocated.
        out.append(shortcut.rows(top, bottom).add_(rows))
        h.release_read(bottom)
        shortcut.release_above(bottom)
    return out


def upsample(conv: nn.Conv2d, x: Bands, groups: int) -> Bands:
    """conv(nearest-2x-upsample(x)) as four 2x2 sub-pixel convolutions of x, in source row strips.

    Each output pixel of a 3x3 conv over a nearest-upsampled map sees only a 2x2 block of source pixels, so
    the upsampled map is never built and the conv costs 4/9 of the plain one (``subpixel_kernels``).
    """
    _, _, height, width = x.shape
    co = conv.out_channels
    kernels, bias = subpixel_kernels(conv.weight, conv.bias)
    out = x.new(co, 2 * height, 2 * width, groups=groups)
    rows_out = strip_rows(out)
    for top, bottom in strips(height, max(1, rows_out // 2)):  # output bands of the output's strip rows
        lo, hi = max(top - 1, 0), min(bottom + 1, height)
        res = F.conv2d(x.rows(lo, hi), kernels, bias, padding=1)  # (B, 4*co, hi - lo + 1, width + 1)
        n, r0 = bottom - top, top - lo
        rows = x.empty_rows(co, 2 * n, 2 * width)
        for phase in range(4):
            a, c = divmod(phase, 2)
            rows[:, :, a::2, c::2] = res[:, phase * co : (phase + 1) * co, r0 + a : r0 + a + n, c : c + width]
        del res
        out.append(rows)
        x.release_read(bottom)
    return out


def norm_act_conv(norm: nn.GroupNorm, conv: nn.Conv2d, x: Bands) -> Bands:
    """conv(SiLU(GroupNorm(x))) for a 3x3, padding-1 conv, strip by strip, freeing x as it goes."""
    activated = Activated(norm, x)
    out = x.new(conv.out_channels)
    for top, bottom in strips(x.shape[2], strip_rows(x)):
        out.append(conv3x3_rows(conv, activated.strip(top, bottom)))
        x.release_read(bottom)
    return out


def decode_up(up_blocks: nn.ModuleList, norm_out: nn.GroupNorm, conv_out: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The decoder after its middle block: up blocks, then GroupNorm-SiLU-conv_out, in strips."""
    groups = norm_out.num_groups  # every GroupNorm of the SD decoder has the same groups
    maps = Bands.whole(x)
    del x
    for block in up_blocks:
        for layer in block.resnets:
            maps = resnet(layer, maps, groups)
        if block.upsamplers is not None:
            maps = upsample(block.upsamplers[0].conv, maps, groups)
    return norm_act_conv(norm_out, conv_out, maps).tensor()


# --- the encoder's down path: the same strips, for img2img's and the hires fix's encode -----------------


def conv3x3_padded(conv: nn.Conv2d, x: Bands, groups: int) -> Bands:
    """A 3x3, padding-1 conv of a map without normalization (the encoder's ``conv_in``), strip by strip."""
    height = x.shape[2]
    out = x.new(conv.out_channels, groups=groups)
    for top, bottom in strips(height, strip_rows(out)):
        lo, hi = max(top - 1, 0), min(bottom + 1, height)
        rows = F.pad(x.rows(lo, hi), (0, 0, lo - (top - 1), bottom + 1 - hi))  # zero rows beyond the edges
        out.append(conv3x3_rows(conv, rows))
        x.release_read(bottom)
    return out


def downsample(conv: nn.Conv2d, x: Bands, groups: int) -> Bands:
    """The SD encoder's downsampler, a stride-2 3x3 conv after one zero row and column at the bottom and
    right, strip by strip: output row r reads input rows 2r to 2r + 2."""
    _, _, height, width = x.shape
    out = x.new(conv.out_channels, height // 2, width // 2, groups=groups)
    for top, bottom in strips(out.shape[2], strip_rows(out)):
        lo, hi = 2 * top, min(2 * bottom + 1, height)
        rows = F.pad(x.rows(lo, hi), (0, 1, 0, 2 * bottom + 1 - hi))
        out.append(F.conv2d(rows, conv.weight, conv.bias, stride=2))
        x.release_above(2 * bottom)  # the next strip reads from row 2 * bottom on
    return out


def encode_down(conv_in: nn.Conv2d, down_blocks: nn.ModuleList, groups: int, x: torch.Tensor) -> torch.Tensor:
    """The encoder before its middle block: conv_in, then each level's ResNets and downsampler, in strips.

    As in decoding, a map is held as bands freed once read, so a full-resolution level holds two of
    its maps (a block's input, kept for its residual, and its first convolution's output) where the
    plain path holds up to four; the result equals the plain path's to float rounding.
    """
    maps = conv3x3_padded(conv_in, Bands.whole(x), groups)
    for block in down_blocks:
        for layer in block.resnets:
            maps = resnet(layer, maps, groups)
        if block.downsamplers is not None:
            maps = downsample(block.downsamplers[0].conv, maps, groups)
    return maps.tensor()
