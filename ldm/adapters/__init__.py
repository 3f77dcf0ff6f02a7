"""Adapters: LoRA and its kin (LoCon, LoHa, LoKr, full and norm diffs, DoRA) applied, listed, rescaled and dropped.

    from ldm.adapters import Adapters
    adapters = Adapters(unet, text_encoder)
    name = adapters.load("style.safetensors", scale=0.8)    # "style"
    adapters.set_scale(name, 0.5); adapters.delete(name)      # the original weights again, exactly

``keys`` places a file's tensors (kohya/LyCORIS and diffusers/peft layouts, diffusers' or the original
SD module names), ``files`` reads and checks a file, ``formats`` computes each kind's weight update,
``apply`` patches the weights and manages adapters by name, ``folder`` finds the files that
prompts name (``<lora:NAME:WEIGHT>``) and their A1111 hashes, ``training`` trains and saves LoRAs with
peft (imported on its own: inference needs no peft). ``Pipeline.load_lora`` and ``ldm txt2img
--lora`` use ``Adapters``; docs/adapters.md describes the formats.
"""

from ldm.adapters.apply import AdapterInfo, Adapters
from ldm.adapters.files import check_scale, parse_lora_argument, read_adapter
from ldm.adapters.folder import find_lora, lora_hash

__all__ = ["AdapterInfo", "Adapters", "check_scale", "find_lora", "lora_hash", "parse_lora_argument", "read_adapter"]
