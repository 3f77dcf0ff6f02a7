"""Textual-inversion embeddings (Gal et al. 2022): learned input vectors that a word of the prompt stands for.

    embeddings = Embeddings(text_encoder, tokenizer)
    embeddings.load("embeddings/")          # every file that fits; the others in embeddings.skipped
    encode_prompts(..., words=embeddings.words())

The files, each read into (name, vectors (n, width)); the name is the file's stem, as in A1111:

- A1111 ``.pt`` / ``.bin``: ``{"string_to_param": {"*": (n, width)}, "step", "sd_checkpoint", ...}``,
  read with ``torch.load(weights_only=True)`` (a pickle that builds anything but tensors and plain
  containers is refused);
- A1111 / kohya ``.safetensors``: ``{"emb_params": (n, width)}``;
- diffusers ``learned_embeds.safetensors`` / ``.bin``: ``{token: (width,) or (n, width)}``;
- SDXL (A1111, civitai, kohya): ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``, one set of vectors per
  text encoder (``Embedding.vectors_for``).

As diffusers' ``load_textual_inversion`` does, the vectors become rows appended to the text encoder's
token-embedding matrix, and a prompt that names the embedding gets those rows' ids in place of the
name's tokens (``ldm.prompts.PromptWord``): the text encoder runs unchanged, the tokenizer is not
touched. An SDXL model has one ``Embeddings`` per text encoder (``encoder="clip_l"`` for ``text_encoder``,
``"clip_g"`` for ``text_encoder_2``), each installing its own vectors of the same files.

Which files a text encoder takes (A1111's rule: an embedding whose shape is not the model's is
skipped): an SD 1.x/2.x encoder (``encoder=None``) takes single-set files of its width; an SDXL encoder
takes SDXL files whose vectors for it have its width. A file of the other family (an SD 1.x
embedding on SDXL, although its 768-wide vectors would fit CLIP ViT-L, or an SDXL one on SD 1.x) does
not fit: ``WidthError`` for one file, skipped with the reason in a folder.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ldm.errors import CheckpointError, InputError, SettingError, placeholder_text
from ldm.prompts import CHUNK_TOKENS, PromptWord, words_used

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
TI_HASH_DIGITS = 12  # A1111 names an embedding in "TI hashes" by the first 12 hex digits of its file's SHA-256
# An SDXL embedding file's keys: the vectors of text_encoder (CLIP ViT-L) and of text_encoder_2 (OpenCLIP bigG).
SDXL_ENCODERS = ("clip_l", "clip_g")
Encoder = Literal["clip_l", "clip_g"]


@dataclass(frozen=True)
class Embedding:
    """One embedding file: its name (the file's stem), vectors (n, width) in fp32, and A1111's metadata.

    An SDXL file holds one set of n vectors per text encoder (``per_encoder``, by ``SDXL_ENCODERS``);
    its ``vectors`` are both sets side by side, (n, 768 + 1280), so that ``width`` is A1111's "shape".
    """

    name: str
    path: Path
    vectors: torch.Tensor
    step: int | None = None
    sd_checkpoint: str | None = None  # the hash of the model it was trained on (A1111's .pt files)
    sd_checkpoint_name: str | None = None
    per_encoder: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: {"clip_l": (n, 768), "clip_g": (n, 1280)}

    @property
    def family(self) -> str:
        """The models it was made for, as errors name them: "SDXL" or "SD 1.x/2.x"."""
        return "SDXL" if self.per_encoder else "SD 1.x/2.x"

    def vectors_for(self, encoder: Encoder | None) -> torch.Tensor:
        """The vectors (n, width) a text encoder reads: ``encoder`` "clip_l" (SDXL's ``text_encoder``) or "clip_g"
        (``text_encoder_2``) for an SDXL file, None for an SD 1.x/2.x one; ``WidthError`` for the other family."""
        if (encoder is None) != (not self.per_encoder):
            held = "clip_l and clip_g vectors" if self.per_encoder else "one set of vectors"
            model = "SD 1.x/2.x" if encoder is None else "SDXL"
            raise WidthError(f"embedding {self.path} is for {self.family} ({held}); this model is {model}: use an embedding made for it", self)
        return self.vectors if encoder is None else self.per_encoder[encoder]

    @property
    def count(self) -> int:
        """Vectors: tokens it takes in a prompt (A1111's "vectors")."""
        return self.vectors.shape[0]

    @property
    def width(self) -> int:
        """Width of each vector, the text encoder's hidden size (A1111's "shape")."""
        return self.vectors.shape[1]


class WidthError(CheckpointError):
    """An embedding whose vectors are not as wide as the text encoder's, or made for the other family of models
    (SD 1.x/2.x or SDXL); ``embedding`` is the file read."""

    def __init__(self, message: str, embedding: Embedding):
        super().__init__(message)
        self.embedding = embedding


@dataclass(frozen=True)
class Skipped:
    """A file in a folder that was not loaded, and why; ``embedding`` where the file itself was readable."""

    path: Path
    reason: str
    embedding: Embedding | None = None


def read_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """The embedding in ``path``; raises ``CheckpointError`` naming the file for anything it cannot use."""
    path = Path(path)
    data = _read_data(path)
    per_encoder = _sdxl_vectors(data, path)
    vectors = torch.cat(list(per_encoder.values()), dim=1) if per_encoder else _checked(_vectors(data, path), path)

    def text(key: str) -> str | None:
        value = data.get(key)
        return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None

    step = data.get("step")
    return Embedding(
        name or path.stem, path, vectors.detach().float().contiguous(),
        step=step if isinstance(step, int) and not isinstance(step, bool) else None,
        sd_checkpoint=text("sd_checkpoint"), sd_checkpoint_name=text("sd_checkpoint_name"), per_encoder=per_encoder,
    )  # fmt: skip


def _checked(vectors: torch.Tensor, path: Path, encoder: str | None = None) -> torch.Tensor:
    """``vectors`` as (n, width) fp32, checked: 1 to a chunk's worth, finite."""
    of = f" ({encoder})" if encoder else ""
    if vectors.ndim == 1:  # diffusers writes a single vector as (width,)
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise CheckpointError(f"embedding {path}: vectors{of} of shape {tuple(vectors.shape)}; expected (vectors, width)")
    if vectors.shape[0] > CHUNK_TOKENS:
        raise CheckpointError(f"embedding {path} has {vectors.shape[0]} vectors{of}; a prompt chunk holds {CHUNK_TOKENS}")
    if not vectors.is_floating_point() or not torch.isfinite(vectors).all():
        raise CheckpointError(f"embedding {path}: its vectors{of} are not finite floating-point numbers")
    return vectors.detach().float().contiguous()


def _sdxl_vectors(data: dict, path: Path) -> dict[str, torch.Tensor]:
    """An SDXL file's vectors per text encoder (``SDXL_ENCODERS``), the same number in each; {} for another file."""
    found = [key for key in SDXL_ENCODERS if key in data]
    if not found:
        return {}
    if len(found) == 1:
        missing = next(key for key in SDXL_ENCODERS if key not in data)
        raise CheckpointError(f"embedding {path} has {found[0]} vectors but no {missing}; an SDXL embedding needs both")
    for key in SDXL_ENCODERS:
        if not isinstance(data[key], torch.Tensor):
            raise CheckpointError(f"embedding {path}: its {key} vectors are a {type(data[key]).__name__}, not a tensor")
    per_encoder = {key: _checked(data[key], path, key) for key in SDXL_ENCODERS}
    counts = [vectors.shape[0] for vectors in per_encoder.values()]
    if counts[0] != counts[1]:
        raise CheckpointError(f"embedding {path} has {counts[0]} clip_l vectors but {counts[1]} clip_g; they must be as many")
    return per_encoder


def _read_data(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"embedding file {path} does not exist")
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise CheckpointError(f"{path} is not an embedding file; give a {', '.join(EMBEDDING_SUFFIXES)} file")
    try:
        if path.suffix.lower() == ".safetensors":
            return load_file(path, device="cpu")
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # also what weights_only raises for a pickle that builds other objects
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused:
            raise CheckpointError(
                f"embedding {path} is a pickle that builds a {refused.group(1)} object; ldm reads only tensors from .pt "
                "files (weights_only): save its vectors as .safetensors"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
        reason = f" ({detail.group(1).strip()})" if detail else ""
        raise CheckpointError(f"cannot read embedding {path}: not a PyTorch file of tensors alone{reason}") from None
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read embedding {path}: {reason}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"embedding {path} holds a {type(data).__name__}, not a dictionary of tensors")
    return data


def _vectors(data: dict, path: Path) -> torch.Tensor:
    """The one tensor of vectors in a file's dictionary, in any of the known layouts."""
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else 0
            raise CheckpointError(f"embedding {path}: string_to_param holds {count} tensors; expected one")
        found = next(iter(params.values()))
    else:
        tensors = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
        if len(tensors) != 1:  # {"emb_params": ...} (A1111 / kohya safetensors) or {token: ...} (diffusers)
            names = [str(key) for key in data]
            keys = ", ".join(names[:6]) + (f", ... ({len(names)} keys)" if len(names) > 6 else "") if names else "none"
            raise CheckpointError(
                f"embedding {path} has an unknown layout (keys: {keys}); expected string_to_param, emb_params or one token's tensor"
            )
        found = next(iter(tensors.values()))
    if not isinstance(found, torch.Tensor):
        raise CheckpointError(f"embedding {path}: its vectors are a {type(found).__name__}, not a tensor")
    return found


def embedding_files(folder: Path) -> list[Path]:
    """The embedding files in ``folder`` and its subfolders (as A1111 reads them), sorted; hidden and empty ones left out."""
    found = (p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES and not p.name.startswith("."))
    return sorted(p for p in found if p.stat().st_size > 0)


class Embeddings:
    """The embeddings one text encoder reads: their vectors are rows after its vocabulary's.

    ``encoder``: which of an SDXL model's text encoders this is ("clip_l": ``text_encoder``, "clip_g":
    ``text_encoder_2``), so that it installs that encoder's vectors of SDXL files; None for SD 1.x/2.x.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, encoder: Encoder | None = None):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.vocabulary = text_encoder.get_input_embeddings().num_embeddings  # the model's own rows
        self.loaded: dict[str, Embedding] = {}  # in load order; rows follow the same order
        self.skipped: dict[str, Skipped] = {}
        self._matches: dict[str, tuple[int, ...]] = {}  # each loaded name's tokens, as a prompt writes it
        self._hashes: dict[str, str] = {}

    @property
    def width(self) -> int:
        return self.text_encoder.get_input_embeddings().embedding_dim

    def load(self, path: str | Path, name: str | None = None) -> list[str]:
        """Load an embedding file, or every file of a folder; returns the names loaded.

        A file that does not fit this text encoder raises; in a folder (which may hold embeddings for
        other models, as A1111's does) it is skipped with a warning and kept in ``skipped``.
        """
        return load_into((self,), path, name)

    def fit(self, embedding: Embedding) -> tuple[int, ...]:
        """The tokens a prompt writes ``embedding``'s name with, if this text encoder can read it and the name
        stands apart from the other loaded names'; raises ``WidthError`` / ``CheckpointError`` otherwise."""
        width = embedding.vectors_for(self.encoder).shape[1]
        if width != self.width:
            of = f" {self.encoder}" if self.encoder else ""
            raise WidthError(
                f"embedding {embedding.path} has{of} vectors of width {width}; this model's text encoder takes {self.width}", embedding
            )
        match = tuple(self.tokenizer(embedding.name, add_special_tokens=False, verbose=False).input_ids)
        if not match:
            raise CheckpointError(f"embedding {embedding.path}: its name {embedding.name!r} is no word a prompt can write")
        other = next((name for name, written in self._matches.items() if written == match and name != embedding.name), None)
        if other is not None:
            raise CheckpointError(f"embedding {embedding.path}: a prompt writes its name as it writes {other!r} ({self.loaded[other].path})")
        return match

    def add(self, embedding: Embedding, match: tuple[int, ...]) -> None:
        """Register ``embedding`` (replacing one of the same name) with ``fit``'s tokens; ``install`` writes its rows."""
        self.loaded[embedding.name] = embedding
        self._matches[embedding.name] = match
        self.skipped.pop(embedding.name, None)
        self._hashes.pop(embedding.name, None)

    def clear(self) -> None:
        """Forget every loaded embedding (``install`` then writes the model's own rows alone); ``skipped`` stays."""
        self.loaded.clear()
        self._matches.clear()
        self._hashes.clear()

    def words(self) -> tuple[PromptWord, ...]:
        """Each loaded embedding as the prompt word that stands for its rows (in ``install``'s order)."""
        words, row = [], self.vocabulary
        for name, embedding in self.loaded.items():
            words.append(PromptWord(name, self._matches[name], tuple(range(row, row + embedding.count))))
            row += embedding.count
        return tuple(words)

    def skipped_words(self) -> tuple[PromptWord, ...]:
        """Each skipped file's name as a prompt word (standing for nothing): a prompt that writes one is refused
        with the reason (``check_not_skipped``), rather than encoded as the plain words of the name."""
        words = []
        for name in self.skipped:
            match = tuple(self.tokenizer(name, add_special_tokens=False, verbose=False).input_ids)
            if match and name not in self.loaded:
                words.append(PromptWord(name, match, ()))
        return tuple(words)

    def check_not_skipped(self, texts: list[str]) -> None:
        """A ``SettingError`` naming ``{prompt}`` where ``texts`` write the name of an embedding that was skipped."""
        named = words_used(self.tokenizer, texts, self.skipped_words())
        if named:
            reason = placeholder_text(self.skipped[named[0]].reason)
            raise SettingError(f"{{prompt}} uses the embedding {named[0]!r}, which was not loaded: {reason}")

    def short_hash(self, name: str) -> str:
        """A1111's hash of a loaded embedding in "TI hashes": the first 12 hex digits of its file's SHA-256."""
        if name not in self._hashes:
            from ldm.loading.hashes import sha256

            self._hashes[name] = sha256(self.loaded[name].path)[:TI_HASH_DIGITS]
        return self._hashes[name]

    def install(self) -> None:
        """The token-embedding matrix: the model's rows, then every loaded embedding's vectors in order."""
        table = self.text_encoder.get_input_embeddings()
        own = table.weight.detach()[: self.vocabulary]
        rows = [own] + [e.vectors_for(self.encoder).to(own.device, own.dtype) for e in self.loaded.values()]
        weight = torch.cat(rows) if len(rows) > 1 else own
        if weight.shape[0] == table.num_embeddings:
            table.weight.data[self.vocabulary :] = weight[self.vocabulary :]
            return
        self.text_encoder.set_input_embeddings(nn.Embedding.from_pretrained(weight, freeze=not table.weight.requires_grad))
        self.text_encoder.config.vocab_size = weight.shape[0]


def load_into(sets: Sequence[Embeddings], path: str | Path, name: str | None = None) -> list[str]:
    """Read an embedding file, or every file of a folder, once, and give it to each of ``sets`` (an SDXL model's two
    text encoders: each takes its own vectors); returns the names loaded.

    A file must fit every set: one that does not raises; in a folder it is skipped with a warning, kept in every
    set's ``skipped``.
    """
    path = Path(path)
    if path.is_dir():
        if name is not None:
            raise InputError(f"name= names one embedding file; {path} is a folder")
        names = []
        for file in embedding_files(path):
            try:
                names.append(add_to(sets, read_embedding(file)))
            except (CheckpointError, InputError) as error:
                for embeddings in sets:
                    embeddings.skipped[file.stem] = Skipped(file, str(error), error.embedding if isinstance(error, WidthError) else None)
                warnings.warn(f"embedding skipped: {error}", stacklevel=3)
    elif path.exists():
        names = [add_to(sets, read_embedding(path, name))]
    else:
        raise InputError(f"embedding file or folder {path} does not exist")
    for embeddings in sets:
        embeddings.install()
    return names


def add_to(sets: Sequence[Embeddings], embedding: Embedding) -> str:
    """Register ``embedding`` in every set, or in none where one cannot read it; returns its name."""
    matches = [embeddings.fit(embedding) for embeddings in sets]
    for embeddings, match in zip(sets, matches):
        embeddings.add(embedding, match)
    return embedding.name
