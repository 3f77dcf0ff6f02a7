"""Textual-inversion embeddings on an SDXL model: each file read once, its vectors on both text encoders.

An SDXL embedding file holds ``clip_l`` vectors for CLIP ViT-L (``text_encoder``) and ``clip_g``
vectors for OpenCLIP bigG (``text_encoder_2``). As A1111 does for SDXL (and diffusers with two
``load_textual_inversion`` calls, one per encoder, with the same token), a prompt word naming the
file inserts the ``clip_l`` vectors in CLIP ViT-L's tokens and the ``clip_g`` vectors in bigG's. A
refiner has bigG alone and takes the ``clip_g`` vectors. An SD 1.x/2.x file fits neither encoder:
it is refused alone, skipped with the reason in a folder (``ldm.adapters.embeddings``' width rule).

``SdxlEmbeddings`` answers as ``Embeddings`` does (``load``, ``loaded``, ``skipped``, ``words``,
``check_not_skipped``, ``short_hash``), through the first encoder's set; ``words_for`` gives each
encoder's own prompt words; ``mirror`` makes a refiner's set its base's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from torch import nn

from ldm.adapters.embeddings import Embedding, Embeddings, Encoder, Skipped, add_to, load_into
from ldm.prompts import PromptWord


class SdxlEmbeddings:
    """One ``Embeddings`` per text encoder an SDXL model (base: both; refiner: bigG) has, loading the same files."""

    def __init__(self, encoders: Iterable[tuple[Encoder, nn.Module, object]]):
        """``encoders``: (``"clip_l"`` or ``"clip_g"``, text encoder, tokenizer) for each text encoder the model has."""
        self.by_encoder: dict[str, Embeddings] = {name: Embeddings(network, tokenizer, name) for name, network, tokenizer in encoders}
        self._first = next(iter(self.by_encoder.values()))

    @property
    def loaded(self) -> dict[str, Embedding]:
        return self._first.loaded

    @property
    def skipped(self) -> dict[str, Skipped]:
        return self._first.skipped

    @property
    def tokenizer(self):
        return self._first.tokenizer

    def load(self, path: str | Path, name: str | None = None) -> list[str]:
        """Load an embedding file, or every file of a folder, on every text encoder; returns the names loaded."""
        return load_into(tuple(self.by_encoder.values()), path, name)

    def mirror(self, embeddings: Iterable[Embedding]) -> None:
        """Make this set exactly ``embeddings`` (another pipeline's, already read), in their order: a refiner takes its
        base's current set, so an embedding the base no longer has (or another base's) does not linger on it."""
        wanted = list(embeddings)
        have = list(self.loaded.values())
        if len(wanted) == len(have) and all(a is b for a, b in zip(wanted, have)):
            return  # the same files, read once: nothing to write
        sets = tuple(self.by_encoder.values())
        for embeddings_of_one in sets:
            embeddings_of_one.clear()
        for embedding in wanted:
            add_to(sets, embedding)
        for embeddings_of_one in sets:
            embeddings_of_one.install()

    def words(self) -> tuple[PromptWord, ...]:
        """The first text encoder's prompt words: which names a prompt uses (the same for both encoders)."""
        return self._first.words()

    def words_for(self, encoder: Encoder) -> tuple[PromptWord, ...]:
        """The prompt words of one text encoder: its own rows for each loaded name."""
        return self.by_encoder[encoder].words()

    def check_not_skipped(self, texts: list[str]) -> None:
        self._first.check_not_skipped(texts)

    def short_hash(self, name: str) -> str:
        return self._first.short_hash(name)
