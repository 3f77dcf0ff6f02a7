"""Reading weight files tensor by tensor, without running code.

- ``.safetensors``: ``safe_open`` reads the header, then each tensor on demand
  as a zero-copy view of the memory-mapped file (copy-on-write); a dtype change
  copies one tensor at a time. Loading thus holds one copy of the weights, and
  when the file's dtype is the target dtype its pages come from the page cache.
- ``.ckpt`` / ``.bin`` / ``.pt``: ``torch.load(weights_only=True)`` with
  ``mmap=True`` (tensors stay in the page cache until used). A pickle that asks
  for anything but tensors and plain containers is refused, so opening an
  untrusted checkpoint cannot run code.

Every failure (missing, truncated, not a checkpoint, unsafe pickle) is a one-line
``CheckpointError``.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ldm.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on a header
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


class _LightningCallback:
    """Inert stand-in for the PyTorch Lightning callback objects that the released SD 1.x
    ``.ckpt`` files pickle next to the weights. Its state is kept as plain data; no code of
    the original class is imported or run."""

    def __init__(self, *args, **kwargs) -> None:
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state


# Fully qualified names that the allowlisting unpickler maps to the inert stand-in.
_STAND_INS = [(_LightningCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]


class TensorFile:
    """One weights file: key -> shape without reading data, tensors read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self.global_step: int | None = None
        self._safe = None
        self._tensors: dict[str, torch.Tensor] = {}
        if not path.exists():
            raise CheckpointError(f"{path} does not exist; pass a .safetensors/.ckpt file or a diffusers folder")
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder, not a weights file")
        if path.suffix in SAFETENSORS_SUFFIXES:
            self._open_safetensors()
        elif path.suffix in PICKLE_SUFFIXES:
            self._open_pickle()
        else:
            raise CheckpointError(f"{path} has an unknown extension; ldm reads .safetensors, .ckpt, .bin, .pt files")

    def _open_safetensors(self) -> None:
        try:
            self._safe = safe_open(str(self.path), framework="pt", device="cpu")
            self.shapes = {key: tuple(self._safe.get_slice(key).get_shape()) for key in self._safe.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(
                f"{self.path} is not a readable safetensors file ({reason}); it may be truncated or not a checkpoint"
            ) from None
        self.metadata = dict(self._safe.metadata() or {})

    def _open_pickle(self) -> None:
        content = self._torch_load()
        if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
            step = content.get("global_step")
            self.global_step = step if isinstance(step, int) else None
            self.metadata = _string_dict(content.get("metadata"))
            content = content["state_dict"]
        if not isinstance(content, Mapping):
            raise CheckpointError(f"{self.path} holds a {type(content).__name__}, not a state dict of tensors")
        self._tensors = {key: value for key, value in content.items() if isinstance(value, torch.Tensor)}
        if not self._tensors:
            raise CheckpointError(f"{self.path} holds no tensors; it is not a model checkpoint")
        self.shapes = {key: tuple(value.shape) for key, value in self._tensors.items()}

    def _torch_load(self):
        zipped = zipfile.is_zipfile(self.path)
        if not zipped:
            _check_legacy_torch_file(self.path)
        with torch.serialization.safe_globals(_STAND_INS):
            try:
                return torch.load(self.path, map_location="cpu", weights_only=True, mmap=zipped)
            except pickle.UnpicklingError as error:
                raise CheckpointError(_unpickling_message(self.path, error)) from None
            # Arbitrary bytes make the unpickler fail in arbitrary ways (IndexError, KeyError, ...).
            except Exception as error:  # noqa: BLE001 - untrusted input, reported as one line
                reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else '-'}"
                raise CheckpointError(
                    f"{self.path} is not a readable PyTorch checkpoint ({reason}); it may be truncated or not a checkpoint"
                ) from None

    def read(self, key: str) -> torch.Tensor:
        if self._safe is not None:
            return self._safe.get_tensor(key)
        return self._tensors[key]

    def dtype_name(self, key: str) -> str:
        """The tensor's dtype as safetensors names it (``F16``, ``F32``, ``I64``...), without reading it."""
        if self._safe is not None:
            return self._safe.get_slice(key).get_dtype()
        return SAFETENSORS_DTYPES.get(self._tensors[key].dtype, str(self._tensors[key].dtype).removeprefix("torch."))

    def own_mapping(self) -> TensorFile:
        """This file read through a memory map of its own (safetensors; pickles share one).

        A tensor read from safetensors views its handle's map, which stays resident until every such
        tensor is freed: giving each network of a single file its own map lets one network's weights
        be freed while the others are in use (``PipelineSetup.weights_after_use="release"``).
        """
        if self._safe is None:
            return self
        other = copy.copy(self)
        other._safe = safe_open(str(self.path), framework="pt", device="cpu")
        return other


def _string_dict(value) -> dict[str, str]:
    """``value`` if it is a dict of strings (ldm's configuration in a .ckpt), else empty."""
    if isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    return {}


# torch.save's format before its zip files begins with this number, pickled (serialization.py's MAGIC_NUMBER).
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _check_legacy_torch_file(path: Path) -> None:
    """Refuse a file that is neither zip nor torch.save's legacy format before torch reads it: torch would
    warn about its pickle protocol and then fail with a request to file an issue."""
    with open(path, "rb") as file:
        head = file.read(64)
    if _LEGACY_MAGIC in head:
        return
    if head[:1] == b"\x80":  # pickle's PROTO opcode: a pickle, but not torch.save's
        raise CheckpointError(
            f"{path} holds pickled Python objects beyond tensors; ldm does not run code from checkpoints: "
            "convert it to .safetensors with a trusted tool"
        )
    raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (neither torch.save's zip nor its older format); it may be truncated or not a checkpoint")


def _unpickling_message(path: Path, error: Exception) -> str:
    text = str(error)
    refusal = f"{path} holds pickled Python objects beyond tensors"
    advice = "ldm does not run code from checkpoints: convert it to .safetensors with a trusted tool"
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if found:
        return f"{refusal} (it imports {found[1]} when loaded, which can run code); {advice}"
    if "Weights only load failed" in text:
        return f"{refusal}; {advice}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{path} is not a readable PyTorch checkpoint ({first or type(error).__name__}); it may be truncated or not a checkpoint"


class TensorSource:
    """Several weight files (a sharded diffusers model) seen as one key -> tensor store."""

    def __init__(self, files: list[TensorFile]) -> None:
        self.files = files
        self._owner = {key: f for f in files for key in f.shapes}
        self.shapes = {key: f.shapes[key] for f in files for key in f.shapes}

    def read(self, key: str) -> torch.Tensor:
        return self._owner[key].read(key)

    def dtype_name(self, key: str) -> str:
        return self._owner[key].dtype_name(key)


# Preferred weight file names in a diffusers component folder, best first: full precision
# before the fp16 variant, safetensors before pickles.
WEIGHT_NAMES = {
    "diffusers": ("diffusion_pytorch_model",),
    "transformers": ("model", "pytorch_model"),
}


def open_component(folder: Path, library: str) -> TensorSource:
    """The weights of one diffusers component folder (unet/, vae/, text_encoder/)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing; a diffusers model folder needs unet/, vae/ and text_encoder/")
    candidates = []
    for variant in ("", ".fp16"):
        for stem in WEIGHT_NAMES[library]:
            for suffix in (".safetensors", ".bin"):
                candidates.append(f"{stem}{variant}{suffix}")
    for name in candidates:
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return TensorSource([TensorFile(folder / shard) for shard in sorted(set(weight_map.values()))])
        if (folder / name).is_file():
            return TensorSource([TensorFile(folder / name)])
    raise CheckpointError(f"{folder} has no weights file (looked for {', '.join(candidates[:2])} and variants)")


class SafetensorsStream:
    """A ``.safetensors`` file read tensor by tensor with plain reads, never memory-mapped.

    ``safe_open`` maps the file, and every page a tensor view has touched stays resident (and counted in
    the process's memory) until the map is closed: streaming through two whole models that way holds both.
    Here each tensor owns its bytes and is freed with them, so a pass over the file holds one tensor at a
    time (``ldm merge``).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.global_step = None  # a TensorFile's, for ``file_configs``: safetensors files have none
        try:
            self._handle = open(self.path, "rb")
            size = int.from_bytes(self._handle.read(8), "little")
            if not 0 < size <= MAX_HEADER_BYTES:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(self._handle.read(size))
            self.metadata = dict(header.pop("__metadata__", None) or {})
            names = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
            self.shapes = {key: tuple(entry["shape"]) for key, entry in header.items()}
            self.dtypes = {key: names[entry["dtype"]] for key, entry in header.items()}
            self._offsets = {key: tuple(entry["data_offsets"]) for key, entry in header.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(
                f"{self.path} is not a readable safetensors file ({type(error).__name__}: {error}); it may be truncated"
            ) from None
        self._start = 8 + size

    def read(self, key: str) -> torch.Tensor:
        begin, end = self._offsets[key]
        data = bytearray(end - begin)
        self._handle.seek(self._start + begin)
        if self._handle.readinto(data) != len(data):
            raise CheckpointError(f"{self.path} ends inside tensor {key}; the file is truncated")
        if not data:
            return torch.empty(self.shapes[key], dtype=self.dtypes[key])
        return torch.frombuffer(data, dtype=self.dtypes[key]).reshape(self.shapes[key])

    def close(self) -> None:
        self._handle.close()
