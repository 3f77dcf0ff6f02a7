"""SDXL's conditioning in a call: both text encoders, the pooled embedding, the micro-conditioning, the schedule window.

Prompt encoding (diffusers' ``StableDiffusionXLPipeline.encode_prompt``; Podell et al. 2023, sec. 2.1):
CLIP ViT-L reads ``prompt``, OpenCLIP bigG reads ``prompt_2`` (default: the prompt), each at its
penultimate layer (``ldm.models.text_encoder.sdxl_states``), and their states are concatenated along
the width; bigG's pooled output conditions the U-Net beside the time embedding. A refiner has bigG
alone, which reads ``prompt`` (diffusers pairs the encoders a model has with the prompts in order).

The A1111 prompt syntax works on both encoders as A1111 reads it for SDXL (``sd_hijack_clip``):
weights, ``BREAK`` and 75-token chunks on each encoder (each pads with its own pad token, each
restores its own mean after weighting), the chunks concatenated along the sequence, and the pooled
embedding taken from the first chunk, unweighted. Prompt editing, alternation and ``AND`` schedule
the same texts on both (``ldm.prompt_schedule``). A prompt of at most 75 tokens gives diffusers'
embeddings; a longer one is cut at 77 tokens by diffusers, while ldm (as A1111) keeps every chunk.

``force_zeros_for_empty_prompt`` (the model folder's option, true for SDXL base): an empty negative
prompt is zeros, states and pooled alike, instead of the encoding of "" (diffusers does so when no
negative prompt is given; A1111 does so for an empty one).

The micro-conditioning (``ldm.sdxl.SdxlOptions``) and the pooled embeddings travel in the call's
``Conditioning``; the guidance wrappers give each row its own (``ldm.guidance``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ldm.errors import ConfigError, InputError, SettingError
from ldm.guidance import Conditioning
from ldm.prompt_schedule import plan_prompts
from ldm.prompts import PromptWord
from ldm.prompts import encode_prompts as encode_texts
from ldm.sdxl import SdxlOptions

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline
    from ldm.pipeline.stages import Call
    from ldm.settings import GenerationSettings

SDXL_ONLY = ("prompt_2", "negative_prompt_2", "sdxl", "refiner")


def is_sdxl(pipe: Pipeline) -> bool:
    """Whether the pipeline's model is SDXL's (base or refiner): it has the second text encoder."""
    return pipe.text_encoder_2 is not None


def check(pipe: Pipeline, s: GenerationSettings, latents: torch.Tensor | None) -> None:
    """Refuse what the model cannot do with these settings, naming the field, before any network runs."""
    if not is_sdxl(pipe):
        given = [name for name in SDXL_ONLY if getattr(s, name) is not None]
        if given:
            named = (s.sdxl.given() or ("sdxl",)) if given[0] == "sdxl" else given  # the option itself: its flag, its key
            raise SettingError(f"{{{named[0]}}} is for SDXL models; this is an SD 1.x/2.x model: drop it")
        return
    options = s.sdxl or SdxlOptions()
    check_cut_schedule(s, options)
    unread = [name for name in options.given() if name.endswith("aesthetic_score")]
    if unread and s.refiner is None and time_id_count(pipe) == 6:
        raise SettingError(f"{{{unread[0]}}} is read by an SDXL refiner; this base reads sizes instead: drop it or add a {{refiner}}")
    if options.denoising_start is not None and latents is None:
        raise InputError("denoising_start continues from a base's latents (output_type='latent' with denoising_end); pass latents=")
    if options.denoising_start is not None and s.init_image is not None:
        raise SettingError("{sdxl}: denoising_start continues from latents, not from an {init_image}; drop one")
    time_id_count(pipe)  # a model whose added conditioning fits neither SDXL layout is refused here


def check_cut_schedule(s: GenerationSettings, options: SdxlOptions) -> None:
    """A schedule cut between a base and a refiner (``refiner``, ``denoising_start`` / ``denoising_end``) runs plain
    txt2img or img2img on each side: refuse what would need carrying across the cut (the hires pass, the mask, the
    ControlNets, whose step window diffusers counts over the whole schedule)."""
    if s.refiner is None and options.denoising_start is None and options.denoising_end is None:
        return
    beside = [("hires_scale", s.hires_scale is not None, "the hires fix"), ("inpaint", s.inpaint is not None, "inpainting"),
              ("control", bool(s.control) and not controls_a_base_part(s), "ControlNets")]  # fmt: skip
    for name, given, what in beside:
        if given:
            raise SettingError(f"{{{name}}}: {what} beside a refiner or denoising_start/end is not built yet; drop one")


def controls_a_base_part(s: GenerationSettings) -> bool:
    """A txt2img call that stops at ``denoising_end`` for a refiner called afterwards: its ControlNets' start/end
    windows count the whole schedule, as diffusers' SDXL ControlNet pipeline counts them (``control_steps``)."""
    options = s.sdxl or SdxlOptions()
    return s.refiner is None and options.denoising_start is None and options.denoising_end is not None and s.init_image is None


def control_steps(call: Call, timesteps: torch.Tensor) -> int:
    """The steps a ControlNet's start/end window is a fraction of: those the call runs, or the whole schedule of a
    base part that stops at ``denoising_end``."""
    return len(call.scheduler.timesteps) if controls_a_base_part(call.settings) else len(timesteps)


def named_encoders(pipe: Pipeline) -> list[tuple[str, Any, Any]]:
    """(name, text encoder, tokenizer) of each encoder the SDXL model has, named as embedding files name them:
    ``clip_l`` (CLIP ViT-L) and ``clip_g`` (OpenCLIP bigG); a refiner has bigG alone."""
    pairs = (("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2))
    return [(name, encoder, tokenizer) for name, encoder, tokenizer in pairs if encoder is not None]


def time_id_count(pipe: Pipeline) -> int:
    """How many micro-conditioning numbers the U-Net reads: 6 (the base's sizes) or 5 (the refiner's aesthetic score)."""
    config = pipe.unet.config
    pooled = pipe.text_encoder_2.config.projection_dim
    count, rest = divmod(config.projection_class_embeddings_input_dim - pooled, config.addition_time_embed_dim)
    if rest or count not in (5, 6):
        raise ConfigError(
            f"this U-Net's added conditioning ({config.projection_class_embeddings_input_dim} inputs) is not SDXL's: "
            f"{pooled} pooled values and 5 or 6 numbers of {config.addition_time_embed_dim}"
        )
    return count


def force_zeros_of(folder: Path | None, family: str) -> bool:
    """``force_zeros_for_empty_prompt``: the folder's ``model_index.json`` value, else the released models' (base: true)."""
    index = folder / "model_index.json" if folder is not None and folder.is_dir() else None
    values = json.loads(index.read_text()) if index is not None and index.is_file() else {}
    return bool(values.get("force_zeros_for_empty_prompt", family == "sdxl"))


# --- encode ----------------------------------------------------------------------------------------


def encode_prompts(pipe: Pipeline, call: Call, last_use: bool = True) -> Conditioning:
    """The call's text states, pooled embeddings and micro-conditioning (``stages.encode_prompts``' SDXL twin)."""
    s = call.settings
    texts, texts_2, cond, uncond = paired_texts(call)
    named = named_encoders(pipe)
    encoders = [(e, t) for _, e, t in named]
    parts, pooled = [], None
    for (name, encoder, tokenizer), these in zip(named, (texts, texts_2)):
        words = pipe.embeddings.words_for(name)  # each encoder's own rows of the embeddings (ldm.adapters.sdxl_embeddings)
        with pipe.residency.running(encoder) as network:
            states, pooled = encode_on(network, tokenizer, these, s.clip_skip, words)  # the last encoder, bigG, pools
        parts.append(states)
    states = torch.cat(same_length(parts, encoders, s.clip_skip, pipe), dim=-1).to(pipe.device, pipe.dtype)
    for encoder, _ in encoders if last_use else ():  # after same_length, which may run one again for its padding
        pipe.residency.done_with(encoder)
    pooled = pooled.to(pipe.device, pipe.dtype)
    if uncond is not None and pipe.force_zeros_for_empty_prompt:
        states, pooled, uncond = zeroed_empty_negatives(s, states, pooled, uncond)
    n = s.num_images_per_prompt

    def per_image(rows) -> torch.Tensor:  # (steps, images): prompt p's rows for each of its images
        return torch.tensor(rows, device=pipe.device).T.repeat_interleave(n, dim=1)

    plan = call.plan
    weights = None if plan.weights is None else tuple(tuple(w for w in part for _ in range(n)) for part in plan.weights)
    return Conditioning(
        states, torch.cat([per_image(part) for part in cond], dim=1), per_image(uncond) if uncond is not None else None,
        weights, pooled, micro_conditioning(pipe, s),
    )  # fmt: skip


def micro_conditioning(pipe: Pipeline, s: GenerationSettings) -> torch.Tensor:
    """(2, n): the conditional and the unconditional rows' micro-conditioning numbers for the call's size."""
    ids = (s.sdxl or SdxlOptions()).time_ids(s.height, s.width, aesthetic=time_id_count(pipe) == 5)
    return torch.tensor(ids, device=pipe.device)


def at_size(pipe: Pipeline, text: Conditioning, s: GenerationSettings) -> Conditioning:
    """``text`` for a pass at ``s``'s size (the hires fix's second pass): SDXL's sizes that default to the image's
    follow it, as A1111 conditions its hires pass on the upscaled size; SD's text reads no size."""
    return replace(text, time_ids=micro_conditioning(pipe, s)) if is_sdxl(pipe) else text


def encode_on(
    encoder, tokenizer, texts: list[str], clip_skip: int | None, words: Sequence[PromptWord] = ()
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoder's states of ``texts`` (A1111's chunks, weights; ``words``: its embeddings' prompt words) and, from
    bigG (the encoder with a projection), the pooled output of their first chunks (A1111 pools the first chunk); None
    from CLIP ViT-L."""
    from transformers import CLIPTextModelWithProjection

    from ldm.models.text_encoder import sdxl_states, sdxl_states_and_pooled

    if not isinstance(encoder, CLIPTextModelWithProjection):
        return encode_texts(encoder, tokenizer, texts, clip_skip=clip_skip, words=words, encode=sdxl_states), None
    first: list[torch.Tensor] = []

    def encode(network, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        states, pooled = sdxl_states_and_pooled(network, ids, clip_skip)
        if not first:  # the first call reads chunk 0 of every text
            first.append(pooled)
        return states

    return encode_texts(encoder, tokenizer, texts, clip_skip=clip_skip, words=words, encode=encode), first[0]


def same_length(parts: list[torch.Tensor], encoders: list, clip_skip: int | None, pipe: Pipeline) -> list[torch.Tensor]:
    """Each encoder's states with as many chunks as the longest (a longer ``prompt_2``): the shorter padded with
    their encoder's encoding of the empty prompt, as A1111 pads the shorter prompts of a batch."""
    length = max(part.shape[1] for part in parts)
    padded = []
    for part, (encoder, tokenizer) in zip(parts, encoders):
        if part.shape[1] < length:
            with pipe.residency.running(encoder) as network:
                empty = encode_on(network, tokenizer, [""], clip_skip)[0].to(part.dtype)
            part = torch.cat([part, empty.expand(len(part), length - part.shape[1], -1)], dim=1)
        padded.append(part)
    return padded


def paired_texts(call: Call) -> tuple[list[str], list[str], tuple, tuple | None]:
    """The texts each encoder reads (row r: ``texts[r]`` on the first, ``texts_2[r]`` on the second) and the rows of the
    prompts' sub-prompts and of the negatives at each step, as ``PromptPlan.cond`` / ``uncond`` hold them."""
    s, plan = call.settings, call.plan
    if s.prompt_2 is None and s.negative_prompt_2 is None:
        return list(plan.texts), list(plan.texts), plan.cond, plan.uncond
    from ldm.prompts import split_lora_tags

    prompts_2 = s.prompt_2 or tuple(split_lora_tags(text)[0] for text in s.prompt)
    negatives_2 = s.negative_prompt_2 or s.negative_prompt
    plan_2 = plan_prompts(list(prompts_2), list(negatives_2) if plan.uncond is not None else None, s.num_inference_steps)
    pairs: dict[tuple[str, str], int] = {}

    def paired(rows, rows_2) -> tuple[int, ...]:
        return tuple(pairs.setdefault((plan.texts[a], plan_2.texts[b]), len(pairs)) for a, b in zip(rows, rows_2))

    cond = tuple(
        tuple(paired(rows, plan_2.cond[min(j, len(plan_2.cond) - 1)][p]) for p, rows in enumerate(part))
        for j, part in enumerate(plan.cond)
    )
    uncond = None if plan.uncond is None else tuple(paired(rows, plan_2.uncond[p]) for p, rows in enumerate(plan.uncond))
    return [a for a, _ in pairs], [b for _, b in pairs], cond, uncond


def zeroed_empty_negatives(
    s: GenerationSettings, states: torch.Tensor, pooled: torch.Tensor, uncond: tuple
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Empty negative prompts (both encoders' texts empty) read a row of zeros: ``force_zeros_for_empty_prompt``."""
    negatives_2 = s.negative_prompt_2 or s.negative_prompt
    empty = [not a and not b for a, b in zip(s.negative_prompt, negatives_2)]
    if not any(empty):
        return states, pooled, uncond
    zero = len(states)
    states = torch.cat([states, states.new_zeros(1, *states.shape[1:])])
    pooled = torch.cat([pooled, pooled.new_zeros(1, *pooled.shape[1:])])
    return states, pooled, tuple((zero,) * len(rows) if blank else rows for rows, blank in zip(uncond, empty))


# --- the schedule's window (denoising_start / denoising_end) ----------------------------------------


def window(call: Call, timesteps: torch.Tensor, train_steps: int) -> torch.Tensor:
    """The timesteps a call with ``denoising_start`` / ``denoising_end`` (or a refiner's switch, which ends the base's
    part) runs, as diffusers' SDXL pipelines cut them: those below ``round(T - start * T)``, then those at or above
    ``round(T - end * T)``."""
    s = call.settings
    start = s.sdxl.denoising_start if s.sdxl is not None else None
    end = s.sdxl.denoising_end if s.sdxl is not None and s.sdxl.denoising_end is not None else s.refiner_switch
    if start is not None:
        timesteps = timesteps[timesteps < boundary(start, train_steps)]
    if end is not None:
        timesteps = timesteps[: int((timesteps >= boundary(end, train_steps)).sum())]
    if len(timesteps) == 0:
        raise SettingError("{sdxl}: its denoising_start/denoising_end (or {refiner_switch}) leave no step to run; move them or add steps")
    return timesteps


def steps_before(call: Call, train_steps: int) -> int:
    """The steps of the call's schedule that ``denoising_start`` cut off (0 without it): where a continuing run's
    prompt schedule and step count go on from. The scheduler's timesteps are set (``prepare_timesteps``)."""
    start = call.settings.sdxl.denoising_start if call.settings.sdxl is not None else None
    if start is None:
        return 0
    return int((call.scheduler.timesteps >= boundary(start, train_steps)).sum())


def boundary(fraction: float, train_steps: int) -> int:
    """The training timestep at ``fraction`` of the way through denoising: ``round(T - fraction * T)``, diffusers' cut."""
    return int(round(train_steps - fraction * train_steps))


def continues(call: Call) -> bool:
    """Whether the call continues from partly denoised latents (``denoising_start``): they are neither noised nor scaled."""
    return call.settings.sdxl is not None and call.settings.sdxl.denoising_start is not None
