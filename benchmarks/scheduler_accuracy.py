"""How many steps each scheduler needs: sampling error against an exactly known distribution.

Data whose every coordinate is drawn from a known 1-D law (a Gaussian, and a mixture of two
Gaussians) has an exact noise predictor (``support.analytic``), i.e. a perfectly trained
network. Each scheduler samples with it from the exact marginal at its first timestep (a
stratified start, so deterministic samplers carry no Monte-Carlo noise), and we report the
1-Wasserstein distance between its samples and the data law at 5, 10, 20, 50 and 1000 steps.
All schedulers use "trailing" spacing, because SD's "leading" grid with steps_offset=1 cannot
take 1000 steps; everything else is the SD 1.5 noise schedule (scaled_linear, epsilon).

    python benchmarks/scheduler_accuracy.py [--samples 65536] [--steps 5 10 20 50 1000] [--out FILE]

Prints a table (also written as a Markdown block into the JSON record) and writes JSON to
``benchmarks/results/NNNNN-scheduler_accuracy.json`` (a new file each run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ldm.io import atomic_write, next_free_path
from ldm.schedulers import SchedulerConfig, create

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # support/ is in the checkout, not installed
from support.analytic import GaussianMixture1D, distribution_error, run_sampler  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATASETS = {
    "gaussian": GaussianMixture1D.gaussian(0.5, 1.0),
    "mixture": GaussianMixture1D((0.3, 0.7), (-1.5, 1.0), (0.3, 0.5)),
}
# (label, registered name, options): defaults first, then the option settings worth comparing.
ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("ddpm", "ddpm", {}),
    ("ddim", "ddim", {}),
    ("euler", "euler", {}),
    ("euler karras", "euler", {"use_karras_sigmas": True}),
    ("euler-ancestral", "euler-ancestral", {}),
    ("dpm-solver 2", "dpm-solver", {"solver_order": 2}),
    ("dpm-solver 3", "dpm-solver", {"solver_order": 3}),
    ("dpm-solver++ 1", "dpm-solver++", {"solver_order": 1}),
    ("dpm-solver++ 2", "dpm-solver++", {"solver_order": 2}),
    ("dpm-solver++ 3", "dpm-solver++", {"solver_order": 3}),
    ("dpm-solver++ 2 karras", "dpm-solver++", {"solver_order": 2, "use_karras_sigmas": True}),
    ("dpm-solver++ 3 karras", "dpm-solver++", {"solver_order": 3, "use_karras_sigmas": True}),
    ("dpm-solver++-sde 2", "dpm-solver++-sde", {"solver_order": 2}),
    ("dpm-solver++-sde 2 karras", "dpm-solver++-sde", {"solver_order": 2, "use_karras_sigmas": True}),
    ("unipc 2", "unipc", {"solver_order": 2}),
    ("unipc 3", "unipc", {"solver_order": 3}),
    ("unipc 2 karras", "unipc", {"solver_order": 2, "use_karras_sigmas": True}),
    ("unipc 3 karras", "unipc", {"solver_order": 3, "use_karras_sigmas": True}),
]


def measure(samples: int, step_counts: list[int], seed: int = 0) -> dict[str, Any]:
    config = SchedulerConfig(timestep_spacing="trailing")
    results: dict[str, Any] = {"rows": {}, "floor": {}}
    for data_name, data in DATASETS.items():
        # What exact samples of the same size score: the noise floor of the stochastic samplers.
        exact = data.sample(samples, torch.Generator().manual_seed(seed))
        results["floor"][data_name] = distribution_error(exact, data)
    for label, name, options in ROWS:
        row: dict[str, dict[str, float]] = {}
        for data_name, data in DATASETS.items():
            row[data_name] = {}
            for steps in step_counts:
                scheduler = create(name, config, **options)
                generator = torch.Generator().manual_seed(seed)
                out = run_sampler(scheduler, data, steps, samples, generator=generator)
                row[data_name][str(steps)] = distribution_error(out, data)
        results["rows"][label] = row
    return results


def table(results: dict[str, Any], step_counts: list[int]) -> str:
    """Markdown table: W1 error per scheduler and step count, Gaussian / mixture."""
    head = "| scheduler | " + " | ".join(f"{n} steps" for n in step_counts) + " |"
    lines = [head, "|" + "---|" * (len(step_counts) + 1)]
    for label, row in results["rows"].items():
        cells = [f"{row['gaussian'][str(n)]:.1e} / {row['mixture'][str(n)]:.1e}" for n in step_counts]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    floor = results["floor"]
    lines.append(f"| (exact samples, noise floor) | {floor['gaussian']:.1e} / {floor['mixture']:.1e} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=65536, help="scalars sampled per run")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 1000])
    parser.add_argument("--out", type=Path, help="JSON file to write (default: a new file in benchmarks/results/)")
    args = parser.parse_args()
    # Elementwise work on one vector: one thread avoids synchronisation overhead on a shared CPU.
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = measure(args.samples, args.steps)
    markdown = table(results, args.steps)
    print("W1 distance to the exact data law (Gaussian / two-Gaussian mixture), trailing spacing, SD 1.5 betas")
    print(markdown)
    record = {
        "benchmark": "scheduler_accuracy",
        "metric": "1-Wasserstein distance between sampled and exact data law",
        "datasets": {k: {"weights": d.weights, "means": d.means, "stds": d.stds} for k, d in DATASETS.items()},
        "config": SchedulerConfig(timestep_spacing="trailing").to_diffusers(),
        "samples": args.samples,
        "steps": args.steps,
        "seconds": round(time.perf_counter() - start, 1),
        **results,
        "table": markdown,
    }
    path = args.out or next_free_path(RESULTS_DIR, "scheduler_accuracy", ".json")
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
