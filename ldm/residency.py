"""Where each network's weights live while a call runs: the policy the pipeline's stages consult.

A stage runs a network inside ``residency.running(module)`` and says ``residency.done_with(module)``
after the network's last use in the call. What that does is the pipeline's set-up, not the stage's:

- offload (``offload_device`` set, for small GPUs): a network sits on the CPU and moves to the
  execution device only while it runs;
- after use, ``"page-out"`` hands a network's memory-mapped weights back to the operating system's
  page cache (``ldm.paging``; they map again on the next use), ``"keep"`` leaves them resident, and
  ``"release"`` frees them for a one-shot call (as stable-diffusion.cpp's CLI does): weights loaded
  from safetensors become resident only when a network first runs, so a one-shot call's peak is
  about the U-Net's weights plus its activations instead of all weights at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ldm.errors import LdmError
from ldm.paging import release_to_page_cache

WeightsAfterUse = Literal["page-out", "keep", "release"]


class ReleasedWeightsError(LdmError):
    """A network's weights were released after a one-shot call (``weights_after_use="release"``)."""


@dataclass(frozen=True)
class Residency:
    """Where networks run (``device``), where they wait (``offload_device``), and what happens after use."""

    device: torch.device
    offload_device: torch.device | None = None
    after_use: WeightsAfterUse = "page-out"

    @contextmanager
    def running(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` on the execution device for the duration of the block (a no-op without offload)."""
        if self.offload_device is None:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to(self.offload_device)

    def done_with(self, module: nn.Module) -> None:
        """The end of ``module``'s last stage in this call: page its weights out or free them, as set up."""
        if self.after_use == "page-out":
            # Only file-mapped weights the process never wrote are unmapped; they map again on next use.
            release_to_page_cache(module)
        elif self.after_use == "release":
            # The meta device holds no data: the parameters' storage (and the file mapping they
            # view) is freed once nothing else refers to it.
            module.to("meta")


def check_loaded(*modules: nn.Module) -> None:
    """Raise ``ReleasedWeightsError`` if a one-shot call released any of ``modules``' weights."""
    # A module without parameters (a stand-in network in tests) has nothing to release.
    if any(next(module.parameters(), torch.empty(0)).is_meta for module in modules):
        raise ReleasedWeightsError(
            "this pipeline released its weights after its one-shot call; load it again with Pipeline.from_pretrained"
        )
