"""How well the default model follows its prompts, read from the pixels.

    python benchmarks/eval_default_model.py                       # weights/ldm-shapes, full grid
    python benchmarks/eval_default_model.py --model DIR --prompts 16 --schedulers dpm-solver++ --steps 20

For a fixed grid of prompts (captions of the training distribution, with and
without size and position) it generates one image per prompt for every
scheduler x step count x guidance scale, reads each image with the
deterministic scorer of ``support.shapes_score`` (background colour, shape colour,
shape class, size and position when the prompt names them) and reports the
accuracy per attribute. It adds DDPM at 1000 steps as the reference sampler,
the held-out colour-shape pairs (never seen in training) at 20 DPM-Solver++
steps, the cost in adherence and fidelity (PSNR against the exact image) of
the opt-in speed-ups, and a contact sheet of samples.

Writes ``<out>/default_model_eval.json``, ``<out>/default_model_eval.md`` and
``<out>/default_model_contact_sheet.png`` (``<out>`` defaults to benchmarks/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.io import atomic_write
from ldm.loading import DEFAULT_MODEL_DIR
from ldm.pipeline import Pipeline
from ldm.schedulers import SCHEDULERS, create

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # support/ is in the checkout, not installed
from support.shapes import COLORS, HELD_OUT_PAIRS, parse_caption, random_sample  # noqa: E402
from support.shapes_score import accuracy, analyze  # noqa: E402
from whole_image import SPEEDUPS  # noqa: E402  (the settings the speed benchmark uses)

RESULTS = Path(__file__).resolve().parent / "results"
MAIN = ("dpm-solver++", 20)  # the setting the targets are stated at
REFERENCE = ("ddpm", 1000)
ATTRIBUTES = ("background", "color", "shape", "size", "position", "all")


def grid_prompts(count: int, seed: int) -> list[str]:
    """``count`` training-distribution captions (held-out pairs excluded), a fixed draw of the dataset stream."""
    return [random_sample(seed, i, 64, split="train").caption for i in range(count)]


def held_out_prompts() -> list[str]:
    """Each held-out colour-shape pair on every other background, in the short form."""
    prompts = []
    for color, shape in sorted(HELD_OUT_PAIRS):
        for background in COLORS:
            if background != color:
                article = "an" if background[0] in "aeiou" else "a"
                prompts.append(f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape} on {article} {background} background")
    return prompts


def run(pipe: Pipeline, prompts: list[str], scheduler, steps: int, guidance: float, seed: int, batch: int,
        **speedup):
    """Images (as uint8 arrays) and the scorer's accuracy for one setting."""
    images: list[np.ndarray] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler, seed=seed + start,
                   **speedup)
        images += [np.asarray(image) for image in out.images]
    readings = [analyze(image) for image in images]
    return images, accuracy(readings, [parse_caption(p) for p in prompts])


def psnr(images: list[np.ndarray], references: list[np.ndarray]) -> float:
    """Peak signal-to-noise ratio in dB over all pixels of the two image lists (8-bit peak 255)."""
    error = np.mean([np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) for a, b in zip(images, references)])
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


def contact_sheet(rows: list[tuple[str, list[np.ndarray]]], columns: list[str], scale: int = 2) -> Image.Image:
    """A grid of samples: one row per prompt, one column per setting, labelled."""
    font = ImageFont.load_default()
    tile = rows[0][1][0].shape[0] * scale
    label_width, header = 300, 16
    sheet = Image.new("RGB", (label_width + tile * len(columns), header + tile * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((label_width + j * tile + 2, 2), name, fill="black", font=font)
    for i, (prompt, images) in enumerate(rows):
        y = header + i * tile
        draw.text((4, y + tile // 2 - 6), prompt, fill="black", font=font)
        for j, image in enumerate(images):
            sheet.paste(Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST), (label_width + j * tile, y))
    return sheet


def markdown(report: dict) -> str:
    head = "| setting | " + " | ".join(ATTRIBUTES) + " | seconds |\n|---|" + "---:|" * (len(ATTRIBUTES) + 1) + "\n"
    lines = [f"# Default model adherence ({report['model']})\n", f"{report['prompts']} prompts, seed {report['seed']}, "
             f"one image per prompt; accuracy in % per attribute read by support.shapes_score.\n"]

    def row(name: str, result: dict) -> str:
        cells = " | ".join(f"{100 * result['accuracy'][a]:.1f}" if a in result["accuracy"] else "-" for a in ATTRIBUTES)
        return f"| {name} | {cells} | {result['seconds']:.0f} |\n"

    lines.append("\n## Training-distribution prompts\n\n" + head)
    for r in report["grid"]:
        lines.append(row(f"{r['scheduler']} {r['steps']} steps, guidance {r['guidance']:g}", r))
    lines.append(f"\n## Held-out colour-shape pairs ({', '.join(' '.join(p) for p in report['held_out_pairs'])})\n\n" + head)
    for r in report["held_out"]:
        lines.append(row(f"{r['scheduler']} {r['steps']} steps, guidance {r['guidance']:g}", r))
    if report["speedups"]:
        exact = report["speedups"][0]
        lines.append(f"\n## Speed-ups ({exact['scheduler']} {exact['steps']} steps, guidance {exact['guidance']:g}; "
                     "PSNR against the exact images)\n\n" + head.replace(" seconds |", " seconds | speed-up | PSNR (dB) |")
                     .replace("---:|\n", "---:|---:|---:|\n"))
        for r in report["speedups"]:
            lines.append(row(r["name"], r).rstrip("\n") + f" {exact['seconds'] / r['seconds']:.2f}x | {r['psnr']:.1f} |\n")
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--prompts", type=int, default=48, help="training-distribution prompts in the grid")
    parser.add_argument("--seed", type=int, default=1000, help="prompt draw and image seeds")
    parser.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), choices=list(SCHEDULERS))
    parser.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 50])
    parser.add_argument("--guidance", nargs="+", type=float, default=[1.0, 3.0, 7.0])
    parser.add_argument("--reference-steps", type=int, default=REFERENCE[1], help="DDPM steps of the reference (0: skip)")
    parser.add_argument("--reference-guidance", nargs="+", type=float, default=[3.0], help="guidance scales of the reference")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--no-speedups", dest="speedups", action="store_false", help="skip the speed-up comparison")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = Pipeline.from_pretrained(args.model)
    prompts = grid_prompts(args.prompts, args.seed)
    report: dict = {"model": str(args.model), "prompts": len(prompts), "seed": args.seed, "grid": [], "held_out": [], "speedups": [],
                    "held_out_pairs": sorted(HELD_OUT_PAIRS)}
    settings = [(s, n, g) for s in args.schedulers for n in args.steps for g in args.guidance]
    if args.reference_steps:
        settings += [(REFERENCE[0], args.reference_steps, g) for g in args.reference_guidance]
    samples: dict[tuple[str, int, float], list[np.ndarray]] = {}
    for scheduler, steps, guidance in settings:
        began = time.time()
        # The reference is the whole training chain t = 999 ... 0: with SD's 'leading' spacing and
        # steps_offset 1, 1000 steps would start past the last timestep.
        full_chain = create(scheduler, dataclasses.replace(pipe.scheduler_config, timestep_spacing="trailing"))
        sampler = full_chain if (scheduler, steps) == (REFERENCE[0], args.reference_steps) else scheduler
        images, result = run(pipe, prompts, sampler, steps, guidance, args.seed, args.batch)
        samples[(scheduler, steps, guidance)] = images
        report["grid"].append({"scheduler": scheduler, "steps": steps, "guidance": guidance, "accuracy": result,
                               "seconds": time.time() - began})
        print(f"{scheduler:>16} {steps:>4} steps guidance {guidance:g}: "
              + " ".join(f"{k} {100 * v:.0f}%" for k, v in result.items()), flush=True)

    held = held_out_prompts()
    held_images: dict[float, list[np.ndarray]] = {}
    for guidance in args.guidance:
        began = time.time()
        images, result = run(pipe, held, MAIN[0], MAIN[1], guidance, args.seed, args.batch)
        held_images[guidance] = images
        report["held_out"].append({"scheduler": MAIN[0], "steps": MAIN[1], "guidance": guidance, "accuracy": result,
                                   "seconds": time.time() - began})
        print(f"held-out {MAIN[0]} {MAIN[1]} steps guidance {guidance:g}: "
              + " ".join(f"{k} {100 * v:.0f}%" for k, v in result.items()), flush=True)

    # Opt-in speed-ups at the main setting and guidance 3 (whole_image.py's settings), against the exact images.
    exact_images: list[np.ndarray] = []
    run(pipe, prompts, MAIN[0], MAIN[1], 3.0, args.seed, args.batch)  # warm-up, so the first timing is not penalised
    for name, options in [("exact", {})] + (list(SPEEDUPS.items()) if args.speedups else []):
        began = time.time()
        images, result = run(pipe, prompts, MAIN[0], MAIN[1], 3.0, args.seed, args.batch, **options)
        exact_images = exact_images or images
        report["speedups"].append({"name": name, "options": options, "scheduler": MAIN[0], "steps": MAIN[1],
                                   "guidance": 3.0, "accuracy": result, "seconds": time.time() - began,
                                   "psnr": psnr(images, exact_images)})
        print(f"speed-up {name}: " + " ".join(f"{k} {100 * v:.0f}%" for k, v in result.items())
              + f" psnr {report['speedups'][-1]['psnr']:.1f} dB", flush=True)

    main_settings = [(MAIN[0], MAIN[1], g) for g in args.guidance if (MAIN[0], MAIN[1], g) in samples]
    rows = [(p, [samples[s][i] for s in main_settings]) for i, p in enumerate(prompts[:10])]
    rows += [(p, [held_images[g][i] for g in args.guidance]) for i, p in list(enumerate(held))[::7]]
    columns = [f"guidance {g:g}" for g in args.guidance]
    args.out.mkdir(parents=True, exist_ok=True)
    if rows and main_settings:
        sheet = contact_sheet(rows, columns)
        atomic_write(args.out / "default_model_contact_sheet.png", lambda tmp: sheet.save(tmp, format="PNG"), overwrite=True)
    atomic_write(args.out / "default_model_eval.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"), overwrite=True)
    atomic_write(args.out / "default_model_eval.md", lambda tmp: tmp.write_text(markdown(report)), overwrite=True)
    print(f"wrote {args.out / 'default_model_eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
