"""Wall time of a newcomer's first command: ``ldm txt2img "a red circle on a blue background"``.

    python benchmarks/first_run.py            # 3 fresh processes, results in benchmarks/results/first_run.json

Each run is a new process started from the shell's point of view (interpreter start, imports,
loading the default model from weights/, 25 DPM-Solver++ steps with guidance, writing the PNG),
timed from outside with a monotonic clock. The issue's target is under 10 seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ldm.io import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a red circle on a blue background"
TARGET_SECONDS = 10.0


def first_run(ldm: str, out: Path) -> float:
    """Seconds for one ``ldm txt2img PROMPT`` process; checks that it wrote exactly one PNG."""
    began = time.perf_counter()
    subprocess.run([ldm, "txt2img", PROMPT, "--out", str(out), "--quiet"], check=True, capture_output=True)
    seconds = time.perf_counter() - began
    written = list(out.glob("*.png"))
    if len(written) != 1:
        raise RuntimeError(f"expected one PNG in {out}, found {len(written)}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    ldm = shutil.which("ldm") or str(Path(sys.executable).with_name("ldm"))
    seconds = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as folder:
            seconds.append(first_run(ldm, Path(folder)))
        print(f"ldm txt2img {PROMPT!r}: {seconds[-1]:.2f} s", flush=True)
    load = os.getloadavg()[0]
    report = {
        "command": f'ldm txt2img "{PROMPT}"',
        "seconds": seconds,
        "median_seconds": statistics.median(seconds),
        "target_seconds": TARGET_SECONDS,
        "cpu_count": os.cpu_count(),
        "load_average_1min": load,
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "first_run.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"), overwrite=True)
    print(f"median {report['median_seconds']:.2f} s (target < {TARGET_SECONDS:.0f} s, 1-min load average {load:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
