"""Build the CLIP BPE tokenizer files that ldm ships in ``ldm/assets/clip_tokenizer/``.

Single-file SD checkpoints carry no tokenizer, and nothing may be downloaded at
run time, so the project ships the real CLIP vocabulary (49,408 tokens). Its
source is the BPE merges file ``bpe_simple_vocab_16e6.txt.gz`` that the
``open_clip_torch`` wheel ships; this script reads it from that wheel (no
install needed) and writes the Hugging Face ``vocab.json`` + ``merges.txt``.

The vocabulary order is CLIP's (Radford et al. 2021, the ``SimpleTokenizer``):
the 256 byte symbols, the same 256 with the end-of-word marker ``</w>``, one
token per merge (the first 48,894 merges), then ``<|startoftext|>`` and
``<|endoftext|>``: 512 + 48,894 + 2 = 49,408.

Usage:
    pip download open_clip_torch --no-deps -d /tmp/oc
    python scripts/build_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "ldm" / "assets" / "clip_tokenizer"
MERGES_USED = 49152 - 256 - 2  # CLIP keeps this many merges so the vocabulary is 49,408


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (CLIP reuses it).

    Insertion order matters: the printable bytes come first, then the rest, and
    CLIP numbers its first 256 tokens in exactly this order.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_merges(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
    lines = raw.split("\n")
    return lines[1 : MERGES_USED + 1]  # line 0 is a version header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="an open_clip_torch wheel")
    args = parser.parse_args()
    merges = read_merges(args.wheel)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408, len(vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {len(vocab)} tokens to {OUT}")


if __name__ == "__main__":
    main()
