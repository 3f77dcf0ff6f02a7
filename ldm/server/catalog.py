"""The files a server offers by name: models and LoRAs, each from its folder.

Embeddings are not named by clients: the engine loads ``--embeddings-dir`` into each model it loads.

A client names a file (``sd_model_checkpoint``, a LoRA); the server looks the name up in a listing
of the folder it was given and never joins a client's text to a path, so ``../../x`` or an absolute
path is simply not found (404). A listing is read when the server starts and again on
``POST /sdapi/v1/refresh-checkpoints`` (as A1111 does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ldm.adapters.folder import lora_files
from ldm.loading.hashes import sha256

MODEL_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelEntry:
    """A model the server can load: a single file (with A1111's hashes) or a diffusers folder."""

    name: str  # the file name with its suffix, or the folder name: what clients send back
    path: Path

    @property
    def stem(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def sha256(self) -> str | None:
        """The file's SHA-256 (cached by ``ldm.loading.hashes``); None for a folder."""
        return sha256(self.path) if self.path.is_file() else None

    @property
    def short_hash(self) -> str | None:
        digest = self.sha256
        return digest[:10] if digest else None

    @property
    def title(self) -> str:
        """A1111's title: ``name.safetensors [hash]``, or the name alone for a folder."""
        short = self.short_hash
        return f"{self.name} [{short}]" if short else self.name

    def named(self, text: str) -> bool:
        """Whether ``text`` is this model's name or stem (no hashing)."""
        return text in (self.name, self.stem)

    def matches(self, text: str) -> bool:
        """Whether a client's ``sd_model_checkpoint`` names this model: name, stem, title or short hash."""
        if self.named(text):
            return True
        short = self.short_hash
        return short is not None and text in (short, f"{self.name} [{short}]")


def list_models(folder: Path | None) -> list[ModelEntry]:
    """The single files and diffusers folders directly in ``folder``, sorted by name."""
    if folder is None:
        return []
    from ldm.loading.diffusers_folder import is_diffusers_folder

    entries = [
        ModelEntry(path.name, path)
        for path in sorted(Path(folder).iterdir())
        if (path.is_file() and path.suffix in MODEL_SUFFIXES) or is_diffusers_folder(path)
    ]
    return [entry for entry in entries if not entry.name.startswith(".")]


@dataclass
class Catalog:
    """The models and LoRAs a server offers; ``refresh`` reads the folders again."""

    startup_model: ModelEntry  # the model loaded at start, listed even when outside models_dir
    models_dir: Path | None
    loras_dir: Path | None

    def __post_init__(self) -> None:
        self.models: list[ModelEntry] = []
        self.refresh()

    def refresh(self) -> None:
        listed = list_models(self.models_dir)
        same = [entry for entry in listed if entry.path.resolve() == self.startup_model.path.resolve()]
        self.models = listed if same else [self.startup_model, *listed]

    def find_model(self, text: str) -> ModelEntry | None:
        """The listed model ``text`` names, or None (a path, ``..`` included, names none).

        Names are tried first: a hash is only computed (and then cached) for a title or hash."""
        named = next((entry for entry in self.models if entry.named(text)), None)
        return named or next((entry for entry in self.models if entry.matches(text)), None)

    def loras(self) -> list[Path]:
        """The files prompts name with ``<lora:NAME:WEIGHT>``: the same listing the pipeline searches."""
        return lora_files(self.loras_dir) if self.loras_dir is not None else []

