"""Prompts: weighting syntax, long prompts in 75-token chunks, and text encoding.

Weighting follows the syntax AUTOMATIC1111's web UI made common:

- ``(word:1.3)`` multiplies the weight of ``word`` by 1.3;
- ``(word)`` multiplies by 1.1 and ``[word]`` divides by 1.1; they nest, so ``((word))`` is 1.21;
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters;
- an unclosed bracket applies to the end of the prompt, a stray closing one is literal text;
- ``BREAK`` (upper case, a word of its own) ends the current 75-token chunk.

A textual-inversion embedding's name, written as a word, stands for its vectors: the adapters give
each one a ``PromptWord`` (its name's tokens and the token ids of its vectors), and the tokens of the
name are replaced by those ids, as A1111 matches names on the token sequence. Each vector counts as
one token of its chunk, and an embedding is never split across two chunks.

CLIP reads 77 tokens: a start token, 75 prompt tokens and an end token. A longer
prompt is split into chunks of 75 tokens, each chunk is encoded on its own as
``[start] tokens [end] [pad...]``, and the embeddings are concatenated along the
sequence axis (the U-Net's cross-attention takes any sequence length), so
nothing is cut. A prompt of at most 75 tokens gives exactly the ids and the
embedding diffusers' ``StableDiffusionPipeline`` gives.

Weights scale each token's embedding. As A1111 does, the embedding is then
rescaled so its mean is unchanged, which keeps weighting from shifting the
overall magnitude the U-Net sees. Our choice: the mean is taken per prompt and
per chunk (A1111 takes it over the whole batch), so an image never depends on
which other prompts share its batch.

LoRA tags (AUTOMATIC1111's "extra networks" syntax, ``modules/extra_networks.py``) name adapter files
to apply for the call: ``<lora:NAME>``, ``<lora:NAME:TE>``, ``<lora:NAME:TE:UNET>`` or the named forms
``te=``/``unet=`` (``<lyco:...>`` is the same). ``split_lora_tags`` takes them out of the text that is
encoded (each tag is replaced by nothing, as A1111 does) and returns them; the pipeline applies them.

A weight that is not finite, or beyond ``MAX_WEIGHT`` (``(word:1e309)``, thousands of nested
brackets), would turn the embedding into infinities and the image into NaN after every step has run;
``parse_prompt`` refuses it at once and names the words it weighs. Brackets nest at most
``MAX_NESTING`` deep.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ldm.errors import InputError, SettingError, placeholder_text

if TYPE_CHECKING:  # torch is imported where it is used: the command line checks prompts before importing it
    import torch

BREAK = ("BREAK", -1.0)
CHUNK_TOKENS = 75
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
MAX_WEIGHT = 100.0  # A1111 users weigh words by 0.5-2; a weight of 100 already swamps the prompt
MAX_NESTING = 32  # brackets open at once; 1.1**32 = 21

_WEIGHT_CLOSE = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)")
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
_ESCAPABLE = "()[]\\"


def parse_prompt(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(fragment, weight)`` pairs; ``BREAK`` appears as ``("BREAK", -1.0)``.

    Adjacent fragments of equal weight are merged, so a prompt without
    weighting syntax comes back as ``[(text, 1.0)]``. A weight beyond ``MAX_WEIGHT`` or brackets
    nested deeper than ``MAX_NESTING`` raise ``InputError``.
    """
    fragments: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if tuple(fragment) != BREAK:
                fragment[1] *= factor

    def add_text(piece: str) -> None:
        for i, part in enumerate(_BREAK_WORD.split(piece)):
            if i > 0:
                fragments.append(list(BREAK))
            if part:
                fragments.append([part, 1.0])

    plain: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            plain.append(text[i + 1])
            i += 2
            continue
        weight_close = _WEIGHT_CLOSE.match(text, i) if char == ":" and open_round else None
        is_syntax = (
            char in "(["
            or weight_close is not None
            or (char == ")" and open_round)
            or (char == "]" and open_square)
        )
        if not is_syntax:
            plain.append(char)
            i += 1
            continue
        add_text("".join(plain))
        plain = []
        if char in "([" and len(open_round) + len(open_square) == MAX_NESTING:
            raise InputError(f"brackets nest more than {MAX_NESTING} deep at character {i + 1}; use (word:1.5) for a strong weight")
        if char == "(":
            open_round.append(len(fragments))
        elif char == "[":
            open_square.append(len(fragments))
        elif weight_close is not None:
            scale_from(open_round.pop(), float(weight_close.group(1)))
            i = weight_close.end()
            continue
        elif char == ")":
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        else:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        i += 1
    add_text("".join(plain))
    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    for text_part, weight in fragments:
        if not abs(weight) <= MAX_WEIGHT and (text_part, weight) != BREAK:  # also NaN
            raise InputError(f"the weight of {text_part.strip()!r} comes to {weight:g}; keep weights within +-{MAX_WEIGHT:g}")
    merged: list[tuple[str, float]] = []
    for text_part, weight in fragments:
        if merged and weight == merged[-1][1] and (text_part, weight) != BREAK and merged[-1] != BREAK:
            merged[-1] = (merged[-1][0] + text_part, weight)
        else:
            merged.append((text_part, weight))
    return merged or [("", 1.0)]


def check_prompt(text: str, name: str = "prompt") -> None:
    """Raise ``SettingError`` naming ``{name}`` if ``text`` is not UTF-8 text or its weights are refused.

    Undecodable bytes of a command line reach Python as lone surrogates (``sys.argv`` is decoded
    with ``surrogateescape``), which the tokenizer cannot take.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise SettingError(
            f"{{{name}}} is not valid UTF-8 text (an undecodable byte at character {error.start + 1}); write it in UTF-8"
        ) from None
    try:
        parse_prompt(text)
    except InputError as error:
        raise SettingError(f"{{{name}}}: {placeholder_text(str(error))}") from None


# --- LoRA tags ----------------------------------------------------------------------------------

# A1111's pattern for an extra network: <kind:arguments>, the arguments split at ":".
NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")  # lyco: the LyCORIS extension's kind, which A1111 reads as lora


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:NAME:TE:UNET>`` of a prompt: the file's name and the scale of each network."""

    name: str  # a file stem in the LoRA folder
    text_encoder: float  # TE: scales the adapter's text-encoder modules (default 1)
    unet: float  # UNET: scales its U-Net modules (default: TE)
    text: str  # the tag as written


def split_lora_tags(text: str, name: str = "prompt") -> tuple[str, tuple[LoraTag, ...]]:
    """``text`` with its LoRA tags removed (what is encoded), and the tags in order.

    A tag of another kind (``<hypernet:x:1>``), a malformed multiplier or one LoRA named twice is a
    ``SettingError`` naming ``{name}`` and the tag: ldm never encodes such a tag as words, nor drops it.
    """
    tags: list[LoraTag] = []

    def take(match: re.Match) -> str:
        tags.append(_lora_tag(match, name))
        return ""

    remaining = NETWORK_TAG.sub(take, text)
    seen: set[str] = set()
    for tag in tags:
        if tag.name in seen:
            raise SettingError(f"{{{name}}} names LoRA {placeholder_text(repr(tag.name))} twice; give each LoRA once")
        seen.add(tag.name)
    return remaining, tuple(tags)


def _lora_tag(match: re.Match, field: str) -> LoraTag:
    """A1111's reading of ``<lora:...>``: arguments with ``=`` are named, the others positional."""
    written = placeholder_text(match.group(0))
    if match.group(1) not in LORA_KINDS:
        raise SettingError(
            f"{{{field}}} has {written}, an extra network of kind {placeholder_text(repr(match.group(1)))} that ldm "
            f"does not apply; only LoRA tags (<lora:NAME:WEIGHT>) are read, remove it"
        )
    positional, named = [], {}
    for item in match.group(2).split(":"):
        parts = item.split("=")
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1]
        else:
            positional.append(item)
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown or len(positional) > 3:
        what = f"the argument {unknown[0]}=" if unknown else "a fourth argument (A1111's dyn)"
        raise SettingError(f"{{{field}}}: {written} has {what}, which ldm does not take; write <lora:NAME:TE:UNET>")
    name = positional[0].strip() if positional else ""
    if not name:
        raise SettingError(f"{{{field}}}: {written} names no LoRA; write <lora:NAME:WEIGHT>")
    text_encoder = _multiplier(named.get("te", positional[1] if len(positional) > 1 else "1"), written, field)
    unet = _multiplier(named.get("unet", positional[2] if len(positional) > 2 else None), written, field)
    return LoraTag(name, text_encoder, text_encoder if unet is None else unet, match.group(0))


def _multiplier(text: str | None, written: str, field: str) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise SettingError(f"{{{field}}}: {written} has the weight {placeholder_text(repr(text))}, which is not a number") from None
    if not math.isfinite(value):
        raise SettingError(f"{{{field}}}: {written} has the weight {placeholder_text(repr(text))}; give a finite number")
    return value


@dataclass(frozen=True)
class PromptWord:
    """A word that stands for other token ids: a textual-inversion embedding's name and its vectors' ids."""

    name: str
    match: tuple[int, ...]  # the name as the tokenizer writes it on its own
    ids: tuple[int, ...]  # what replaces it: one id per vector, rows the adapters added to the text encoder


@dataclass
class TokenChunks:
    """A prompt as 77-token chunks: ``ids[k]`` and ``weights[k]`` each hold 77 entries."""

    ids: list[list[int]]
    weights: list[list[float]]
    words: list[str] = field(default_factory=list)  # the PromptWords used, by name, in order of appearance

    @property
    def is_weighted(self) -> bool:
        return any(w != 1.0 for chunk in self.weights for w in chunk)


def tokenize_prompt(tokenizer, text: str, words: Sequence[PromptWord] = ()) -> TokenChunks:
    """Parse ``text`` and cut its tokens into chunks of 75, each framed as CLIP expects.

    Where a word of ``words`` is written, its ids replace its tokens; they stay together in one chunk.
    """
    chunks = TokenChunks([], [])
    tokens: list[int] = []
    weights: list[float] = []
    find_word = _word_finder(tokenizer, words)

    def close_chunk() -> None:
        padding = CHUNK_TOKENS - len(tokens)
        chunks.ids.append([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        chunks.weights.append([1.0, *weights, 1.0] + [1.0] * padding)
        tokens.clear()
        weights.clear()

    for fragment, weight in parse_prompt(text):
        if (fragment, weight) == BREAK:
            if tokens:
                close_chunk()
            continue
        fragment_tokens = tokenizer(fragment, add_special_tokens=False, verbose=False).input_ids
        position = 0
        while position < len(fragment_tokens):
            word = find_word(fragment_tokens, position)
            piece = word.ids if word is not None else (fragment_tokens[position],)
            if len(tokens) + len(piece) > CHUNK_TOKENS:
                close_chunk()
            tokens.extend(piece)
            weights.extend([weight] * len(piece))
            position += len(word.match) if word is not None else 1
            if word is not None and word.name not in chunks.words:
                chunks.words.append(word.name)
    if tokens or not chunks.ids:
        close_chunk()
    return chunks


def _word_finder(tokenizer, words: Sequence[PromptWord]):
    """``find(tokens, position)``: the word written at ``position``, else None.

    As A1111 does, a name matches its own token sequence (so, as CLIP lowercases, in any case), the
    longest name first. Unlike A1111 it must also start a word: "cat" does not match in "bobcat",
    which CLIP may write as "bob" + "cat". A name's last token ends a word (CLIP's "</w>"), so the
    match ends one too.
    """
    by_first: dict[int, list[PromptWord]] = {}
    for word in sorted(words, key=lambda w: len(w.match), reverse=True):
        by_first.setdefault(word.match[0], []).append(word)

    def find(tokens: list[int], position: int) -> PromptWord | None:
        for word in by_first.get(tokens[position], ()):
            if tuple(tokens[position : position + len(word.match)]) == word.match and (
                position == 0 or tokenizer.convert_ids_to_tokens(tokens[position - 1]).endswith("</w>")
            ):
                return word
        return None

    return find


def words_used(tokenizer, prompts: list[str], words: Sequence[PromptWord]) -> list[str]:
    """The names of ``words`` that ``prompts`` use, in order of first appearance."""
    used: list[str] = []
    if words:
        for prompt in prompts:
            used += [name for name in tokenize_prompt(tokenizer, prompt, words).words if name not in used]
    return used


def encode_prompts(
    text_encoder, tokenizer, prompts: list[str], clip_skip: int | None = None, words: Sequence[PromptWord] = (), encode=None
) -> torch.Tensor:
    """Embeddings ``(len(prompts), 77 * chunks, dim)`` for a batch of prompts; ``words``: see ``tokenize_prompt``.
    ``encode(text_encoder, ids, clip_skip)`` reads a chunk's states (default ``encode_tokens``, SD's; SDXL's reads
    another layer, ``ldm.pipeline.sdxl``).

    Prompts with fewer chunks than the longest one are padded with encodings
    of the empty prompt, as A1111 does, so the batch has one sequence length.
    The result is on the text encoder's device and in its dtype.
    """
    import torch

    from ldm.models.text_encoder import encode_tokens

    encode = encode or encode_tokens
    device = text_encoder.device
    tokenized = [tokenize_prompt(tokenizer, prompt, words) for prompt in prompts]
    empty = tokenize_prompt(tokenizer, "")
    num_chunks = max(len(chunks.ids) for chunks in tokenized)
    for chunks in tokenized:
        missing = num_chunks - len(chunks.ids)
        chunks.ids.extend(empty.ids * missing)
        chunks.weights.extend(empty.weights * missing)

    encoded = []
    for k in range(num_chunks):
        ids = torch.tensor([chunks.ids[k] for chunks in tokenized], device=device)
        embedding = encode(text_encoder, ids, clip_skip=clip_skip)
        if any(chunks.is_weighted for chunks in tokenized):
            weights = torch.tensor([chunks.weights[k] for chunks in tokenized], device=device)
            embedding = apply_weights(embedding, weights)
        encoded.append(embedding)
    return torch.cat(encoded, dim=1)


def apply_weights(embedding: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale token embeddings ``(B, T, D)`` by ``weights (B, T)``, keeping each prompt's mean.

    The mean is restored only where it stands clear of zero: an embedding that averages to about
    zero (a final LayerNorm without bias, as in freshly initialised models) would be rescaled by a
    ratio of rounding noise, of any size or sign, or by zero over zero. Its weighted tokens are
    kept as they are.
    """
    import torch

    original = embedding.float()
    weighted = original * weights[..., None].float()
    mean = original.mean(dim=(1, 2), keepdim=True)
    ratio = mean / weighted.mean(dim=(1, 2), keepdim=True)
    clear = (mean.abs() > 1e-3 * original.abs().mean(dim=(1, 2), keepdim=True)) & (ratio > 0) & ratio.isfinite()
    return (weighted * torch.where(clear, ratio, 1.0)).to(embedding.dtype)
