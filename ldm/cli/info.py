"""`ldm info FILE_OR_FOLDER`: what a model file is, before loading it.

A checkpoint (single file or diffusers folder): its family, prediction type, dtypes, parameters per
network, layout and A1111's hashes. An adapter (LoRA, LoCon, LoHa, LoKr, DoRA, diffs): its kinds,
ranks, alphas, the networks it changes, kohya's training metadata and its A1111 hash (AutoV3). A VAE
or TAESD, or a textual-inversion embedding. Only headers, configs and metadata are read (plus the
file's bytes once for the hashes, cached; --no-hash skips them). An unknown file exits with code 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TOP_TAGS = 10  # of ss_tag_frequency, in the text output


def register(sub) -> None:
    parser = sub.add_parser("info", help="show what a model, adapter, VAE or embedding file is, without loading it",
                            description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a .safetensors/.ckpt/.pt file or a diffusers folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object (every metadata value included)")
    parser.add_argument("--no-hash", action="store_true", help="skip the hashes (which read the whole file once)")
    parser.set_defaults(run=run, flag=str)  # its errors name no settings


def run(args: argparse.Namespace) -> int:
    from ldm.loading.info import describe

    found = describe(args.path, hashes=not args.no_hash)
    print(json.dumps(found, indent=2, sort_keys=True) if args.json else "\n".join(lines(found)))
    return 0


def lines(found: dict) -> list[str]:
    """``found`` as ``name: value`` lines; nested values indented, long kohya values summarised."""
    out = []
    for key, value in found.items():
        if isinstance(value, dict) and value:
            out.append(f"{key}:")
            out += [f"  {name}: {_short(name, item)}" for name, item in value.items()]
        else:
            out.append(f"{key}: {_format(value)}")
    return out


def _short(name: str, value) -> str:
    if name == "ss_tag_frequency":
        try:
            folders = json.loads(value)
            counts: dict[str, int] = {}
            for tags in folders.values():
                for tag, count in tags.items():
                    counts[tag] = counts.get(tag, 0) + count
            top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP_TAGS]
            return ", ".join(f"{tag} ({count})" for tag, count in top) + (" ..." if len(counts) > TOP_TAGS else "")
        except (ValueError, AttributeError, TypeError):
            pass
    text = _format(value)
    return text if len(text) <= 200 else text[:200] + "... (--json shows all)"


def _format(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10**4:
        return f"{value:,}" + (f" ({value / 1e6:.1f} M)" if value >= 10**6 else "")
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "-"
    return str(value)
