"""Run every performance benchmark of ldm against diffusers in one go and publish the table.

    python benchmarks/run_all.py [--quick] [--no-speedups] [--no-load] [--compile] [--large 1024]
    python benchmarks/run_all.py --speedups-only [--quick] [--large 1024]   # add to the last run
    python benchmarks/run_all.py --large-only 1024   # only the large image (kept for later tables)
    python benchmarks/run_all.py --parts load,vae_decode   # re-measure these parts, keep the others

Builds (once, cached in ``$LDM_BENCH_CACHE`` or the temp folder) a random-weight SD 1.5-architecture
model in the diffusers layout and as a single file, then runs, each measurement in its own process:
load (``benchmarks/load.py``, owned by the loading area), one guided U-Net step with the machine's
GEMM rate, one VAE decode, whole images (and the speed-ups), and optionally one large image
in bounded memory. Writes ``results/summary-<spec>.json``, the table between the markers of
``benchmarks/README.md`` and ``results/time_per_image-<spec>.png``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import unet_step  # noqa: E402
import vae_decode  # noqa: E402
import whole_image  # noqa: E402

README = common.BENCH_DIR / "README.md"
PARTS = ("load", "unet_step", "vae_decode", "whole_image")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# (what, target as "ldm / diffusers <= x" or a GEMM fraction >= x)
TARGETS = {
    "unet_time": 1.0,
    "unet_gemm_fraction": 0.85,
    "vae_time": 0.8,
    "vae_peak": 0.6,
    "load_time": 0.3,
    "whole_time": 0.9,
    "whole_peak": 0.75,
}


def run_load(quick: bool) -> dict[str, Any]:
    """The loading area's benchmark (fp32, as the other benchmarks); its printed ratio line parsed."""
    script = common.BENCH_DIR / "load.py"
    if not script.exists():
        return {"error": "benchmarks/load.py not present"}
    command = [sys.executable, str(script), "--dtype", "fp32", "--repeats", "3", *(["--quick"] if quick else [])]
    done = subprocess.run(command, capture_output=True, text=True, cwd=common.REPO_DIR)
    text = done.stdout.strip()
    if done.returncode != 0:
        return {"error": (done.stderr or text).strip().splitlines()[-1]}
    numbers: dict[str, Any] = {"output": text.splitlines()}
    match = re.search(r"time ldm/diffusers ([\d.]+).*peak RSS ldm/diffusers ([\d.]+).*file size ([\d.]+)", text, re.S)
    if match:
        numbers.update(time_ratio=float(match.group(1)), peak_ratio=float(match.group(2)),
                       load_memory_over_file=float(match.group(3)))  # fmt: skip
    return numbers


def run_large(spec: common.ModelSpec, size: int) -> dict[str, Any]:
    """One ldm image at ``size`` px with VAE tiling and sliced attention, 2 steps: time and peak memory."""
    folder, _ = common.build_model(spec)
    args = {"spec": spec.name, "folder": str(folder), "size": size, "steps": 2, "large": True, "impl": "ldm"}
    result = {"size": size, "steps": 2, **common.run_worker("whole_image.py", args)}
    common.save_results("large", spec, result)
    return result


def last_large(spec: common.ModelSpec) -> dict[str, Any] | None:
    """The last large-image run (``--large``, kept in ``results/large-<spec>.json``), with its own date."""
    path = common.RESULTS_DIR / f"large-{spec.name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(summary: dict[str, Any]) -> str:
    """The Markdown table of the README: measured values, ratios and whether each target is met."""
    u, v, w, load = summary["unet_step"], summary["vae_decode"], summary["whole_image"], summary.get("load", {})
    frac = u["ldm"]["fraction_of_matmul"]

    def verdict(value: float | None, key: str, higher_is_better: bool = False) -> str:
        if value is None:
            return "not measured"
        ok = value >= TARGETS[key] if higher_is_better else value <= TARGETS[key]
        return "met" if ok else "NOT met"

    rows = [
        ("U-Net step, batch 2 (s)", f"{u['ldm']['median_s']:.2f}", f"{u['diffusers']['median_s']:.2f}",
         f"{u['time_ratio']:.3f}", "<= 1.0", verdict(u["time_ratio"], "unet_time")),
        ("U-Net step achieved GFLOP/s (of GEMM)", f"{u['ldm']['gflops']:.0f} ({frac:.0%})",
         f"{u['diffusers']['gflops']:.0f} ({u['diffusers']['fraction_of_matmul']:.0%})", "",
         ">= 85 % of GEMM", verdict(frac, "unet_gemm_fraction", True)),
        ("VAE decode (s)", f"{v['ldm']['median_s']:.2f}", f"{v['diffusers']['median_s']:.2f}",
         f"{v['time_ratio']:.3f}", "<= 0.8", verdict(v["time_ratio"], "vae_time")),
        ("VAE decode peak RSS (MiB)", f"{v['ldm']['peak_mib']:.0f}", f"{v['diffusers']['peak_mib']:.0f}",
         f"{v['peak_ratio']:.3f}", "<= 0.6", verdict(v["peak_ratio"], "vae_peak")),
        ("Whole image (s)", f"{w['ldm']['time_s']:.1f}", f"{w['diffusers']['time_s']:.1f}",
         f"{w['time_ratio']:.3f}", "<= 0.9", verdict(w["time_ratio"], "whole_time")),
        ("Whole image peak RSS, reusable Pipeline in one process (MiB)", f"{w['ldm']['peak_mib']:.0f}",
         f"{w['diffusers']['peak_mib']:.0f}", f"{w['peak_ratio']:.3f}", "<= 0.75", verdict(w["peak_ratio"], "whole_peak")),
        *([("Whole image peak RSS, one-shot `ldm txt2img` process, load included (MiB)", f"{w['one_shot']['peak_mib']:.0f}",
            f"{w['diffusers']['peak_mib']:.0f} (pipeline above)", f"{w['one_shot']['peak_ratio']:.3f}", "<= 0.75",
            verdict(w["one_shot"]["peak_ratio"], "whole_peak"))] if "one_shot" in w else []),
        ("Load, single file fp32 (time ratio)", "", "", f"{load['time_ratio']:.3f}" if "time_ratio" in load else "n/a",
         "<= 0.3", verdict(load.get("time_ratio"), "load_time")),
    ]  # fmt: skip
    spec = summary["spec"]
    measured = summary.get("measured", {})
    machines = summary.get("cpu", {})
    when = "; ".join(
        f"{part} {at}" + (f" on {machines[part]['model']}" if part in machines else " (CPU not recorded)")
        for part, at in measured.items()
    ) if len(set(measured.values())) > 1 else ""
    lines = [
        *([f"Parts measured at: {when}.", ""] if when else []),
        f"Run {summary['time']} ({spec['name']}: {spec['image_size']}x{spec['image_size']}, whole image "
        f"{spec['steps']} DPM-Solver++ steps, torch threads {common.THREADS}); U-Net step {u['flops'] / 1e12:.3f} TFLOP"
        + (f" (ldm computes {u['ldm_flops'] / 1e12:.3f}: the guided latent is shared up to the first cross-attention)"
           if "ldm_flops" in u else "")
        + f", GEMM rate {max(u['matmul_gflops']):.0f} GFLOP/s.",
        "",
        "| measure | ldm | diffusers | ldm / diffusers | target | |",
        "|---|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"Outputs agree: U-Net max |diff| {u['max_abs_diff_vs_diffusers']:.1e}, VAE max |diff| "
        f"{v['max_abs_diff_vs_diffusers']:.1e}, whole image PSNR ldm vs diffusers {w['psnr_ldm_vs_diffusers_db']:.1f} dB.",
    ]
    if "one_shot" in w:
        same = "equals" if w["one_shot"]["png_equals_reusable_pipeline_image"] else "DIFFERS from"
        lines += ["", f"One-shot `ldm txt2img` (frees each network after its stage): {w['one_shot']['time_s']:.1f} s for the "
                      f"whole process, imports and load included; its PNG {same} the reusable pipeline's image in 8 bits."]  # fmt: skip
    variants = u.get("variants", {})
    if variants:
        parts = [f"{k}: {x['ratio_to_exact']:.2f}x the exact time" if "ratio_to_exact" in x else f"{k}: {x['error']}"
                 for k, x in variants.items()]  # fmt: skip
        lines += ["", "U-Net variants (ldm, time relative to the default): " + "; ".join(parts) + "."]
    for key, where in (("whole_image", f"{spec['image_size']}x{spec['image_size']}"), ("speedups_256", "256x256")):
        block = summary.get(key, {})
        if "speedups" not in block:
            continue
        first = next(iter(block["speedups"].values()))
        exact = first["time_s"] * first["speedup"]  # the exact image of the run that measured them
        lines += ["", f"Speed-ups, {where}, {spec['steps']} steps, full-size model; exact ldm image "
                      f"{exact:.1f} s:", "",
                  "| speed-up (ldm) | options | time (s) | speed-up | PSNR vs exact (dB) |", "|---|---|---|---|---|"]  # fmt: skip
        for name, s in block["speedups"].items():
            opts = ", ".join(f"{k}={x}" for k, x in s["options"].items())
            lines.append(f"| {name} | {opts} | {s['time_s']:.1f} | {s['speedup']:.2f}x | {s['psnr_db']:.1f} |")
    if "load" in summary and "output" in load:
        lines += ["", "Load (benchmarks/load.py):", "", "```", *load["output"], "```"]
    if "large" in summary:
        large = summary["large"]
        when = f" (run {large['time'].replace('T', ' ')[:16]})" if "time" in large else ""
        lines += ["", f"Large image{when}: {large['size']}x{large['size']}, {large['steps']} steps, VAE tiling + sliced "
                      f"attention: {large['median_s']:.1f} s, peak RSS {large['peak_mib'] / 1024:.2f} GiB."]  # fmt: skip
    lines += ["", f"![time per image against steps](results/time_per_image-{spec['name']}.png)"]
    return "\n".join(lines)


def update_readme(text: str) -> None:
    current = README.read_text() if README.exists() else f"{BEGIN}\n{END}\n"
    head, rest = current.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def time_lines(summary: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Per engine, (fixed seconds, seconds per step) of an image: the line through the measured whole images,
    or, with one step count, the measured image and the U-Net step time as the slope."""
    w, u = summary["whole_image"], summary["unet_step"]
    lines = {}
    for impl in ("ldm", "diffusers"):
        points = sorted((int(s), r[impl]["time_s"]) for s, r in w["by_steps"].items())
        if len(points) >= 2:
            (s0, t0), (s1, t1) = points[0], points[-1]
            slope = (t1 - t0) / (s1 - s0)
        else:
            slope = u[impl]["median_s"]
            s1, t1 = points[-1]
        lines[impl] = (t1 - slope * s1, slope)
    deepcache = w.get("speedups", {}).get("deepcache")
    if deepcache:
        fixed, slope = lines["ldm"]
        steps = summary["spec"]["steps"]
        lines["ldm + DeepCache"] = (fixed, (deepcache["time_s"] - fixed) / steps)
    return lines


def plot(summary: dict[str, Any], path: Path) -> None:
    """Time per image against steps, one line per engine, measured images as dots (a PNG drawn with PIL)."""
    lines = time_lines(summary)
    max_steps = 50
    w, h, left, bottom, top, right = 720, 440, 70, 50, 30, 180
    y_max = max(f + s * max_steps for f, s in lines.values()) * 1.05
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)

    def xy(steps: float, seconds: float) -> tuple[float, float]:
        return (left + steps / max_steps * (w - left - right), h - bottom - seconds / y_max * (h - top - bottom))

    d.line([xy(0, 0), xy(max_steps, 0)], fill="black")
    d.line([xy(0, 0), xy(0, y_max)], fill="black")
    for s in range(0, max_steps + 1, 10):
        x, y = xy(s, 0)
        d.line([(x, y), (x, y + 4)], fill="black")
        d.text((x - 6, y + 8), str(s), fill="black")
    tick = 10 ** max(0, len(str(int(y_max / 5))) - 1)
    tick = max(tick, round(y_max / 5 / tick) * tick)
    for k in range(0, int(y_max / tick) + 1):
        x, y = xy(0, k * tick)
        d.line([(x - 4, y), (x, y)], fill="black")
        d.text((x - 40, y - 6), f"{k * tick:g}", fill="black")
    d.text((left + 150, h - 22), "denoising steps (DPM-Solver++)", fill="black")
    d.text((8, 8), f"seconds per {summary['spec']['image_size']}px image, 2-core CPU", fill="black")
    colors = {"ldm": (200, 30, 30), "diffusers": (30, 60, 200), "ldm + DeepCache": (30, 150, 60)}
    measured = {impl: [(int(s), r[impl]["time_s"]) for s, r in summary["whole_image"]["by_steps"].items()]
                for impl in ("ldm", "diffusers")}  # fmt: skip
    if "ldm + DeepCache" in lines:
        measured["ldm + DeepCache"] = [(summary["spec"]["steps"], summary["whole_image"]["speedups"]["deepcache"]["time_s"])]
    for i, (name, (fixed, slope)) in enumerate(lines.items()):
        color = colors.get(name, "black")
        d.line([xy(1, fixed + slope), xy(max_steps, fixed + slope * max_steps)], fill=color, width=2)
        for s, t in measured.get(name, []):
            x, y = xy(s, t)
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        d.line([(w - right + 15, top + 20 * i + 6), (w - right + 40, top + 20 * i + 6)], fill=color, width=2)
        d.text((w - right + 45, top + 20 * i), name, fill="black")
    d.text((w - right + 15, top + 20 * len(lines) + 10), "dots: measured\nlines: fixed + steps x step", fill="gray")
    img.save(path)


def main(argv: list[str]) -> None:
    spec = common.spec_from_argv(argv)
    quick = spec is common.QUICK
    start = time.time()
    common.build_model(spec)
    flags = ["--quick"] if quick else []
    summary_path = common.RESULTS_DIR / f"summary-{spec.name}.json"
    if "--table-only" in argv:  # redraw the table and plot of the last run (after editing this script)
        summary = json.loads(summary_path.read_text())
        if (large := last_large(spec)) is not None:  # a later --large-only run, with its own date
            summary["large"] = large
        plot(summary, common.RESULTS_DIR / f"time_per_image-{spec.name}.png")
        update_readme(table(summary))
        return
    if "--large-only" in argv:  # the large image alone; the next tables show it with its own date
        result = run_large(spec, int(argv[argv.index("--large-only") + 1]))
        print(f"large image {result['size']}px: {result['median_s']:.1f} s, peak RSS {result['peak_mib'] / 1024:.2f} GiB")
        return
    if "--speedups-only" in argv:  # add the speed-ups (and the large image) to the last full run
        summary = json.loads(summary_path.read_text())
        summary["whole_image"]["speedups"] = whole_image.main(flags + ["--speedups-only"])["speedups"]
    else:
        # --parts load,unet_step,...: re-measure only these; the others stay as the last run measured them.
        parts = argv[argv.index("--parts") + 1].split(",") if "--parts" in argv else list(PARTS)
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise SystemExit(f"unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
        summary = json.loads(summary_path.read_text()) if len(parts) < len(PARTS) else {"spec": spec.__dict__}
        measured = summary.setdefault("measured", {part: summary["time"] for part in PARTS if part in summary})
        if "whole_image" in measured and "speedups" in summary.get("whole_image", {}):
            measured.setdefault("speedups", measured["whole_image"])
        machines = summary.setdefault("cpu", {})  # part -> the CPU it was measured on (parts may be from other runs)
        for part in parts:
            measured[part] = time.strftime("%Y-%m-%d %H:%M")
            machines[part] = common.cpu_info()
        if "whole_image" in parts and "--no-speedups" not in argv:
            measured["speedups"] = measured["whole_image"]  # measured again with the whole images
            machines["speedups"] = machines["whole_image"]
        summary["time"] = time.strftime("%Y-%m-%d %H:%M")
        if "load" in parts and "--no-load" not in argv:
            summary["load"] = run_load(quick)
            print("load:", summary["load"].get("output", summary["load"])[-1:])
        if "unet_step" in parts:
            summary["unet_step"] = unet_step.main(flags + (["--compile"] if "--compile" in argv else []))
        if "vae_decode" in parts:
            summary["vae_decode"] = vae_decode.main(flags)
        if "whole_image" in parts:
            earlier = summary.get("whole_image", {}).get("speedups")
            summary["whole_image"] = whole_image.main(flags + ([] if "--no-speedups" in argv else ["--speedups"]))
            if earlier and "speedups" not in summary["whole_image"]:  # kept, with the date of the run that measured them
                summary["whole_image"]["speedups"] = earlier
    if "--large" in argv:
        summary["large"] = run_large(spec, int(argv[argv.index("--large") + 1]))
    elif (large := last_large(spec)) is not None:
        summary["large"] = large
    summary["wall_s"] = time.time() - start
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    plot(summary, common.RESULTS_DIR / f"time_per_image-{spec.name}.png")
    text = table(summary)
    if not quick or "--publish" in argv:
        update_readme(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
