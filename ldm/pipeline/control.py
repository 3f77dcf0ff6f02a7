"""ControlNet in a generation call: the networks a call's units name, their control maps, and the network
wrapper that adds their residuals to the U-Net's (Zhang et al. 2023; ``ldm.models.controlnet``).

    resolve   ``prepare``: each unit's ControlNet found (loaded by name, or read from its file or folder and
              kept while calls name it), checked against the U-Net, its control map made (``ldm.control``;
              cut to "only masked" inpainting's box, as the init image is)
    denoise   ``running``: the ControlNets on the execution device while the loop runs;
              ``controlled(network, ...)``: network(x, t, text) -> U-Net(x, t, text, residuals=sum of the units')

The wrapper computes what diffusers' ``StableDiffusionControlNetPipeline`` computes, step by step:

- unit u acts at step i of n unless i / n < start or (i + 1) / n > end (``control_guidance_start/end``);
  an idle unit adds nothing (diffusers adds its zeros);
- ``mode="balanced"``: every residual times ``scale``; ``"prompt"`` and ``"controlnet"``: residual k of K
  times ``scale * 10^(k / (K - 1) - 1)`` (``torch.logspace(-1, 0, K)``, K = 13 for SD: the skips and the middle);
- ``"controlnet"`` (diffusers' guess mode) under classifier-free guidance: the ControlNet runs on the
  conditional rows only and the unconditional rows get zeros; so do shuffle-type (``global_pool_conditions``)
  networks, whose residuals are spatial means;
- the units' residuals are summed in unit order (``MultiControlNetModel``).

Each control map's hint embedding E(c) depends on nothing that changes between steps, so it is computed
once per call (diffusers recomputes the same tensor every step).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ldm.control import ControlUnit, Crop, control_map
from ldm.errors import SettingError, placeholder_text
from ldm.guidance import Conditioning, Network
from ldm.models import set_kernels
from ldm.models.controlnet import ControlNet
from ldm.models.layers import repeat_rows
from ldm.models.unet import ControlResiduals
from ldm.residency import check_loaded
from ldm.settings import GenerationSettings

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline


@dataclass(frozen=True)
class PreparedUnit:
    """A call's unit with its network and its control map, (1, C, H, W) in [0, 1] at the output size."""

    unit: ControlUnit
    network: ControlNet
    image: torch.Tensor
    label: str  # the model as the infotext names it: "name [hash]" (A1111's old 8-digit hash) or "name"


@dataclass(frozen=True)
class _Loaded:
    network: ControlNet
    path: Path
    label: str
    version: int  # the file's modification time when it was read


class ControlNets:
    """A pipeline's ControlNets: those loaded by name (``Pipeline.load_controlnet``), kept until unloaded, and
    those units name by path, read on first use and kept while consecutive calls name them."""

    def __init__(self) -> None:
        self.named: dict[str, _Loaded] = {}
        self._by_path: dict[Path, _Loaded] = {}
        self._lock = threading.Lock()

    def load(self, pipe: Pipeline, path: str | Path, name: str | None = None) -> str:
        loaded = _read(pipe, Path(path))
        name = name or _unique(loaded.path.stem if loaded.path.is_file() else loaded.path.name, self.named)
        with self._lock:
            self.named[name] = loaded
        return name

    def find(self, pipe: Pipeline, model: str | Path) -> _Loaded:
        """The network ``model`` names: a loaded name, else a file or folder (read again when it changed)."""
        if isinstance(model, str) and model in self.named:
            check_loaded(self.named[model].network)
            return self.named[model]
        path = Path(model)
        if not path.exists():
            known = ", ".join(sorted(self.named)) or "none"
            raise SettingError(
                f"{{control.model}} {placeholder_text(repr(str(model)))} is neither a ControlNet file or folder nor a name "
                f"loaded with load_controlnet (loaded: {placeholder_text(known)})"
            )
        key = path.resolve()
        with self._lock:
            known = self._by_path.get(key)
        if known is None or known.version != _version(key) or _released(known.network):
            known = _read(pipe, path)
        with self._lock:
            self._by_path[key] = known
        return known

    def keep_only(self, paths: set[Path]) -> None:
        """Forget the networks read by path that a call no longer names (their memory goes with them)."""
        with self._lock:
            self._by_path = {key: value for key, value in self._by_path.items() if key in paths}


def _read(pipe: Pipeline, path: Path) -> _Loaded:
    from ldm.loading.controlnet import load_controlnet
    from ldm.loading.hashes import legacy_hash

    setup = pipe.setup
    network = load_controlnet(path, device="cpu" if setup.cpu_offload else setup.device, dtype=setup.dtype, base=pipe.unet.config)
    label = f"{path.stem} [{legacy_hash(path)}]" if path.is_file() else path.name
    return _Loaded(network, path, label, _version(path.resolve()))


def _version(path: Path) -> int:
    return path.stat().st_mtime_ns


def _released(network: ControlNet) -> bool:
    return next(network.parameters()).is_meta


def _unique(name: str, taken: dict) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


# --- resolve ----------------------------------------------------------------------------------------


def prepare(pipe: Pipeline, s: GenerationSettings, crop: Crop | None = None) -> tuple[PreparedUnit, ...]:
    """Each unit of the (filled) settings with its network, fitted to the pipeline's set-up, and its control map
    (cut to "only masked" inpainting's box of the init image when there is one: ``crop``, see ``control_map``)."""
    prepared = []
    for unit in s.control:
        loaded = pipe.controlnets.find(pipe, unit.model)
        _fit(pipe, loaded.network)
        factor = loaded.network.config.downsample_factor
        if s.width % factor or s.height % factor:
            raise SettingError(f"this ControlNet reads control images in steps of {factor} pixels; make {{width}} and {{height}} multiples of it")
        image = control_map(unit, s.width, s.height, crop)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        prepared.append(PreparedUnit(unit, loaded.network, tensor, loaded.label))
    named = {Path(unit.model).resolve() for unit in s.control if not (isinstance(unit.model, str) and unit.model in pipe.controlnets.named)}
    pipe.controlnets.keep_only(named)
    return tuple(prepared)


def _fit(pipe: Pipeline, network: ControlNet) -> None:
    """``network`` in the pipeline's set-up: where its networks wait, dtype, memory format, attention, fast paths."""
    setup = pipe.setup
    network.to(device="cpu" if setup.cpu_offload else setup.device, dtype=setup.dtype, memory_format=pipe.memory_formats.unet)
    network.set_attention(setup.attention, setup.attention_slice_size)
    set_kernels(network, pipe.kernels)


# --- denoise ----------------------------------------------------------------------------------------


@contextmanager
def running(pipe: Pipeline, units: tuple[PreparedUnit, ...], last_use: bool = True) -> Iterator[None]:
    """The units' networks on the execution device for the block, handed back (``done_with``) after it when
    it is their last use in the call (a hires pass runs them again)."""
    networks = list({id(prepared.network): prepared.network for prepared in units}.values())
    with ExitStack() as stack:
        for network in networks:
            stack.enter_context(pipe.residency.running(network))
        yield
    for network in networks if last_use else ():
        pipe.residency.done_with(network)


ADDED = ("text_embeds", "time_ids")  # the network inputs an SDXL ControlNet reads besides the text states


def controlled(network: Network, units: tuple[PreparedUnit, ...], text: Conditioning, steps: int, dtype: torch.dtype) -> Network:
    """``network`` with the units' residuals added at each of the ``steps`` calls; ``network`` itself without units."""
    if not units:
        return network
    return ControlledNetwork(network, units, text, steps, dtype)


class ControlledNetwork:
    """A network ``f(x, t, text, **conditions)`` that runs the call's ControlNets first and hands their summed
    residuals to the U-Net. Counts its calls (one per denoising step), so it is made afresh for each call."""

    def __init__(self, network: Network, units: tuple[PreparedUnit, ...], text: Conditioning, steps: int, dtype: torch.dtype):
        self.network = network
        self.units = units
        self.steps = steps
        self.parts = text.parts  # conditional rows per image
        self.guided = text.uncond is not None
        device = text.states.device
        # E(c) once per call: (1, C0, h, w) per unit, shared by every row and step.
        self.hints = [u.network.embed_hint(u.image.to(device, dtype)) for u in units]
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        step = self.calls
        self.calls += 1
        # Classifier-free guidance's calls hold the unconditional rows first (B of them), then k * B conditional ones.
        uncond = x.shape[0] if self.guided and text.shape[0] == (self.parts + 1) * x.shape[0] else 0
        total = None
        for prepared, hint in zip(self.units, self.hints):
            unit = prepared.unit
            if step / self.steps < unit.start or (step + 1) / self.steps > unit.end:
                continue
            residuals = unit_residuals(prepared, hint, x, t, text, uncond, conditions)
            total = residuals if total is None else total + residuals
        if total is None:
            return self.network(x, t, text, **conditions)
        return self.network(x, t, text, residuals=total, **conditions)


def unit_residuals(
    prepared: PreparedUnit,
    hint: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    text: torch.Tensor,
    uncond: int,
    conditions: dict[str, torch.Tensor] | None = None,
) -> ControlResiduals:
    """One unit's scaled residuals for a call whose first ``uncond`` text rows are unconditional; ``conditions``:
    the U-Net's other inputs, of which the ControlNet reads SDXL's per-row pooled text and micro-conditioning
    (``ADDED``; a guidance-distilled U-Net's ``timestep_cond`` is the U-Net's alone, as in diffusers)."""
    unit, network = prepared.unit, prepared.network
    pooled = network.config.global_pool_conditions
    conditional_only = uncond > 0 and (unit.mode == "controlnet" or pooled)
    first = uncond if conditional_only else 0
    added = {name: rows[first:] for name, rows in (conditions or {}).items() if name in ADDED}
    residuals = network(x, t, text[first:], hint, **added)
    if unit.mode == "balanced" or pooled:
        residuals = residuals.scaled(unit.scale)
    else:  # diffusers' guess-mode ramp 10^(k/12 - 1) (the original ControlNet's soft weights, 0.825^(12 - k), are within 1 %)
        residuals = residuals.scaled(torch.logspace(-1, 0, len(residuals.down) + 1, device=x.device) * unit.scale)
    if conditional_only:
        residuals = with_zero_rows(residuals, uncond, text.shape[0] - uncond)
    return residuals


def with_zero_rows(residuals: ControlResiduals, uncond: int, cond: int) -> ControlResiduals:
    """Residuals of the ``cond`` conditional rows with zeros prepended for the ``uncond`` unconditional ones."""

    def padded(r: torch.Tensor) -> torch.Tensor:
        r = repeat_rows(r, cond)
        return torch.cat([r.new_zeros((uncond, *r.shape[1:])), r])

    return ControlResiduals(tuple(padded(r) for r in residuals.down), padded(residuals.mid))
