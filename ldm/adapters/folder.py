"""A folder of LoRA files that prompts name by file stem (``<lora:NAME:WEIGHT>``), and their A1111 hashes.

As AUTOMATIC1111 does, the folder and its subfolders are searched for ``.safetensors``, ``.pt`` and
``.ckpt`` files; a name is a file's stem, else the ``ss_output_name`` that kohya's trainer writes
into a ``.safetensors`` file's metadata (A1111's "alias", which its LoRA cards insert). Two files with
the same stem are an error naming both, where A1111 silently takes one.

The hash image metadata records (``Lora hashes: "name: 0123456789ab"``) is A1111's: the
``sshs_model_hash`` a kohya file carries, else the first 12 hex digits of the SHA-256 of a
``.safetensors`` file's tensor bytes (after its header, so editing metadata keeps it), else of the
whole file for ``.pt`` / ``.ckpt``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ldm.errors import InputError, SettingError, placeholder_text
from ldm.loading.hashes import sha256, tensors_sha256
from ldm.prompts import LoraTag

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
LORA_HASH_DIGITS = 12  # A1111's NetworkOnDisk.shorthash
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on a header
_HEX = re.compile(r"[0-9a-fA-F]{12,64}")


def lora_files(folder: Path) -> list[Path]:
    """The LoRA files in ``folder`` and its subfolders, sorted (hidden files left out)."""
    found = (path for path in Path(folder).rglob("*") if path.is_file() and path.suffix in LORA_SUFFIXES)
    return sorted(path for path in found if not path.name.startswith("."))


def find_lora(folder: Path | None, name: str) -> Path:
    """The file ``<lora:name>`` means in ``folder``; ``InputError`` naming the name and the folder otherwise."""
    if folder is None:
        raise InputError(f"no LoRA folder is set to find {name!r} in; pass --loras-dir DIR (Python: pipe.configure(loras_dir=DIR))")
    if not Path(folder).is_dir():
        raise InputError(f"the LoRA folder {folder} is not a folder")
    files = lora_files(folder)
    named = [path for path in files if path.stem == name] or [path for path in files if alias(path) == name]
    if not named:
        raise InputError(f"LoRA {name!r} not found in {folder} (its files and subfolders: .safetensors, .pt, .ckpt)")
    if len(named) > 1:
        raise InputError(f"LoRA {name!r} is ambiguous in {folder}: {named[0]} and {named[1]}; rename one")
    return named[0]


def lora_hash(path: Path) -> str:
    """A1111's short hash of a LoRA file (12 hex digits), as its ``Lora hashes`` infotext writes it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return sha256(path)[:LORA_HASH_DIGITS]
    recorded = metadata(path).get("sshs_model_hash")
    if isinstance(recorded, str) and _HEX.fullmatch(recorded):
        return recorded[:LORA_HASH_DIGITS].lower()
    return tensors_sha256(path)[:LORA_HASH_DIGITS]


def alias(path: Path) -> str | None:
    """The ``ss_output_name`` of a ``.safetensors`` file's metadata (None for other files, or none)."""
    name = metadata(path).get("ss_output_name") if path.suffix == ".safetensors" else None
    return name if isinstance(name, str) else None


def metadata(path: Path) -> dict:
    """A ``.safetensors`` file's ``__metadata__``, read from its header alone; {} if it has none or is not one."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size > MAX_HEADER_BYTES:
                return {}
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return {}
    found = header.get("__metadata__") if isinstance(header, dict) else None
    return found if isinstance(found, dict) else {}


@dataclass(frozen=True)
class PromptLora:
    """A LoRA tag of a call's prompts with the file it names and that file's A1111 hash."""

    tag: LoraTag
    path: Path
    hash: str

    @property
    def adapter_name(self) -> str:
        """Its name among the pipeline's adapters, which no file stem takes: ``<lora:style>``."""
        return f"<lora:{self.tag.name}>"

    @property
    def infotext_name(self) -> str:
        """The name ``Lora hashes`` gives it: as written, without ``:`` and ``,`` (A1111's)."""
        return self.tag.name.replace(":", "").replace(",", "")


def prompt_loras(folder: Path | None, tags: tuple[LoraTag, ...]) -> tuple[PromptLora, ...]:
    """The file and hash of each tag; a ``SettingError`` naming ``{prompt}`` and the tag for a name not found."""
    found = []
    for tag in tags:
        try:
            path = find_lora(folder, tag.name)
        except InputError as error:
            raise SettingError(f"{{prompt}}: {placeholder_text(tag.text)}: {placeholder_text(str(error))}") from None
        found.append(PromptLora(tag, path, lora_hash(path)))
    return tuple(found)
