"""Inpainting in a generation call: the mask's latents, the U-Net's extra inputs, the known region, the paste.

The stages call one ``Inpainting`` (``Call.inpaint``), made by ``stages.resolve`` when a call has a
mask or an outpainting (``GenerationSettings.inpaint``, pixels planned by ``ldm.inpainting``) or its
U-Net reads one (an inpainting model, 2 * latent channels + 1 inputs):

    start       initial latents, replacing img2img's: z_0 of the image (VAE posterior sample), the seed's
                noise, the masked image's latents, in the order diffusers' StableDiffusionInpaintPipeline
                draws them from each image's generator; strength 1 starts from pure noise as it does
    network     an inpainting U-Net reads [x_t, mask, masked-image latents] (mask and masked image not
                scaled by the scheduler): a wrapper around the network, under guidance
    after_step  an ordinary U-Net repaints everything, so after each step the known region is put back:
                x <- (1 - m) * q(z_{t_next} | z_0) + m * x, the image's latents noised to the next timestep
                with the start's noise, m the mask at latent size (the final step puts back z_0 itself)
    paste       the decoded images laid over the original with the blurred mask as opacity (A1111's
                overlay; "only masked" scales the generated box back into place first)

An inpainting model called without a mask does what A1111 does: the whole image is masked (all
white) and the masked image is grey (zero in [-1, 1]), encoded like any masked image; so txt2img on
it equals inpainting any image with an all-white mask at strength 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.control import Crop
from ldm.guidance import Network
from ldm.images import to_pil
from ldm.inpainting import MaskPlan
from ldm.masks import THRESHOLD, resize_crop
from ldm.random import randn

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline
    from ldm.pipeline.stages import Call
    from ldm.settings import GenerationSettings


def takes_mask(pipe: Pipeline) -> bool:
    """Whether the U-Net is an inpainting model's: latents, a mask channel and the masked image's latents in."""
    return pipe.unet.config.in_channels == 2 * pipe.vae.config.latent_channels + 1


class Inpainting:
    """One call's inpainting: built by ``resolve``, started by ``initial_latents``, read by ``denoise`` and the decode."""

    def __init__(self, plan: MaskPlan | None, conditioned: bool, fill: str = "original"):
        self.plan = plan  # None: an inpainting model called without a mask (all of it repainted)
        self.conditioned = conditioned  # the U-Net reads the mask and the masked image (else: blending)
        self.fill = fill
        # Set by start():
        self.mask: torch.Tensor | None = None  # (1, 1, h, w): 1 repaints, at latent size
        self.masked: torch.Tensor | None = None  # (B, C, h, w): the masked image's scaled latents
        self.known: torch.Tensor | None = None  # (B, C, h, w): z_0 of the image, for blending
        self.noise: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self.add_noise: Callable[..., torch.Tensor] | None = None

    @classmethod
    def for_call(cls, pipe: Pipeline, s: GenerationSettings) -> Inpainting | None:
        """The call's inpainting (``s`` filled: its size known), or None when there is none."""
        conditioned = takes_mask(pipe)
        if s.inpaint is None:
            return cls(None, conditioned) if conditioned else None
        return cls(s.inpaint.plan(s.init_image, s.width, s.height), conditioned, s.inpaint.inpainting_fill)

    @property
    def crop(self) -> Crop | None:
        """"Only masked": (the output's size, the box of it that is generated at width x height), else None."""
        plan = self.plan
        return None if plan is None or plan.crop is None else (plan.original.size, plan.crop)

    # --- start ---------------------------------------------------------------------------------------

    def start(self, pipe: Pipeline, call: Call, timesteps: torch.Tensor, starting_noise: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The loop's first latents (fp32), and the mask, masked-image latents and z_0 the loop reads."""
        s, shape, device = call.settings, call.shape, pipe.device
        image, pixel_mask = self._pixels(call, device)
        self.mask = F.interpolate(pixel_mask, size=shape[-2:])  # nearest, as diffusers' prepare_mask_latents
        full = s.strength is None or s.strength == 1.0  # diffusers' is_strength_max: the start is the noise alone

        def posterior_noise() -> torch.Tensor:
            return randn(shape, call.generators, device, torch.float32)

        posterior = None
        if image is not None and (not self.conditioned or not full):
            posterior = self._encode(pipe, image)
            self.known = self._latents(pipe, posterior, posterior_noise, shape)
        noise = call.latents.to(device, torch.float32) if call.latents is not None else starting_noise()
        if self.conditioned:
            masked_image = image * (pixel_mask < 0.5) if image is not None else torch.zeros((1, 3, *pixel_mask.shape[-2:]), device=device)
            self.masked = self._latents(pipe, self._encode(pipe, masked_image), posterior_noise, shape)
        elif posterior is not None:
            # diffusers encodes the masked image for an ordinary U-Net too, drawing its posterior noise; the draw
            # is made (and the unused latents not computed) so each generator goes on as diffusers' does.
            posterior.sample_with(posterior_noise)
        self.noise, self.timesteps, self.add_noise = noise, timesteps, call.scheduler.add_noise
        if self.known is not None and self.fill in ("latent-noise", "latent-nothing"):
            # A1111's "latent noise" / "latent nothing": the masked area's z_0 is the seed's noise / zero.
            self.known = self.known * (1 - self.mask) + (noise * self.mask if self.fill == "latent-noise" else 0)
        if full or self.known is None:
            return noise * call.scheduler.init_noise_sigma
        return call.scheduler.add_noise(self.known, noise, timesteps[:1].repeat(shape[0]))

    def _pixels(self, call: Call, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The image to encode ((1, 3, H, W) in [-1, 1]; None for txt2img) and the mask ((1, 1, H, W), 1 repaints)."""
        if self.plan is None:
            image = call.init.to(device, torch.float32) if call.init is not None else None
            return image, torch.ones((1, 1, call.settings.height, call.settings.width), device=device)
        image = torch.from_numpy(np.asarray(self.plan.image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2.0 - 1.0
        mask = torch.from_numpy(np.asarray(self.plan.mask) >= THRESHOLD).float()[None, None]
        return image.to(device), mask.to(device)

    @staticmethod
    def _encode(pipe: Pipeline, image: torch.Tensor):
        from ldm.pipeline.stages import encode_image  # stages imports this module; the encoder is img2img's, tiles and all

        return encode_image(pipe, image)

    @staticmethod
    def _latents(pipe: Pipeline, posterior, noise: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """Each image's scaled latents: one posterior sample per generator (TAESD's encoder draws none)."""
        return posterior.sample_with(noise).float().expand(shape) * pipe.vae.config.scaling_factor

    # --- denoise -------------------------------------------------------------------------------------

    def network(self, network: Network) -> Network:
        """``network`` as the denoiser calls it; an inpainting U-Net gets [x, mask, masked-image latents]."""
        if not self.conditioned:
            return network
        mask, masked = self.mask, self.masked

        def run(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
            rows, dtype = x.shape[0], x.dtype  # x in the network's dtype: the wrapper sits inside the format change
            return network(torch.cat([x, mask.expand(rows, -1, -1, -1).to(dtype), masked.to(dtype)], dim=1), t, text, **conditions)

        return run

    def after_step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """After step ``i``: an ordinary U-Net's known region put back, noised to the next timestep (none after the last)."""
        if self.conditioned:
            return x
        known = self.known
        if i < len(self.timesteps) - 1:
            known = self.add_noise(known, self.noise, self.timesteps[i + 1 : i + 2].repeat(x.shape[0]))
        return (1 - self.mask) * known + self.mask * x

    def blended(self, x0: torch.Tensor) -> torch.Tensor:
        """An x_0 estimate with an ordinary U-Net's known region put back (z_0 itself): a call stopped early."""
        if self.conditioned or self.known is None:
            return x0
        return (1 - self.mask) * self.known + self.mask * x0

    # --- decode --------------------------------------------------------------------------------------

    def paste(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded images ((B, 3, h, w) in [0, 1]) laid over the original: the output's pixels, where the overlay is 0
        exactly the init image's. "Only masked" scales each into its box first (through 8-bit PIL, as A1111 and diffusers)."""
        plan = self.plan
        if plan is None:
            return images
        original = _tensor(plan.original, images.device)  # (1, 3, H, W)
        alpha = torch.from_numpy(np.asarray(plan.overlay, dtype=np.float32) / 255.0)[None, None].to(images.device)
        generated = images
        if plan.crop is not None:
            x1, y1, x2, y2 = plan.crop
            generated = original.repeat(images.shape[0], 1, 1, 1)
            for b, image in enumerate(to_pil(images)):
                generated[b, :, y1:y2, x1:x2] = _tensor(resize_crop(image, x2 - x1, y2 - y1), images.device)[0]
        return original * (1 - alpha) + generated * alpha


def _tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    """An RGB PIL image as (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None].to(device)

