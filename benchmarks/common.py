"""Shared machinery of the benchmarks: model specs, the cached random-weight model, isolated
measurement processes, peak memory, FLOP counts and the machine's matrix-multiply rate.

Every measurement runs in its own Python process (``run_worker``), so the peak resident memory
of one measurement is not inflated by another's and no allocator state is shared. A worker
prints one JSON line last; the orchestrator parses it. Peak memory is Linux's ``VmHWM`` (the
high-water mark of resident memory), reset right before the measured call by writing ``5`` to
``/proc/self/clear_refs``, so it is the peak *during* that call, weights and libraries included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = Path(os.environ.get("LDM_BENCH_CACHE", Path(tempfile.gettempdir()) / "ldm-bench-models"))
THREADS = 2  # the machine: 2 cores, and both engines get the same
PROMPT = "a photograph of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"
GUIDANCE = 7.5

Impl = Literal["ldm", "diffusers"]


@dataclass(frozen=True)
class ModelSpec:
    """An SD 1.5-architecture model size and the workload the benchmarks run on it."""

    name: str
    unet_widths: tuple[int, ...]  # U-Net block_out_channels
    vae_widths: tuple[int, ...]  # VAE block_out_channels
    text_width: int  # CLIP hidden size (= U-Net cross-attention width)
    text_layers: int
    text_heads: int
    image_size: int  # pixels per side of the benchmarked image
    steps: int  # denoising steps of the whole-image benchmark
    plot_steps: tuple[int, ...]  # step counts timed for the time-per-image plot
    repeats: int  # timed runs per process after one warm-up
    model: str = ""  # cache folder of the weights when shared with another spec (default: name)


FULL = ModelSpec("sd15", (320, 640, 1280, 1280), (128, 256, 512, 512), 768, 12, 12, 512, 20, (20,), 2)
# Same architecture at about 1/5 of the width and 1/2 of the resolution: a few minutes end to end.
QUICK = ModelSpec("quick", (64, 128, 256, 256), (32, 64, 128, 128), 256, 4, 4, 256, 8, (4, 8), 2)
# The full-size model at 256x256: speed-ups with 20 steps in a quarter of the full-size time.
SD15_256 = ModelSpec("sd15-256", FULL.unet_widths, FULL.vae_widths, 768, 12, 12, 256, 20, (20,), 2, model="sd15")
SPECS = {"full": FULL, "quick": QUICK, "sd15-256": SD15_256}


# --- the cached random-weight model ---------------------------------------------------------------


def model_paths(spec: ModelSpec) -> tuple[Path, Path]:
    """(diffusers folder, single .safetensors file) of ``spec`` in the cache."""
    name = spec.model or spec.name
    root = CACHE_DIR / name
    return root / "diffusers", root / f"{name}.safetensors"


def build_model(spec: ModelSpec) -> tuple[Path, Path]:
    """Build ``spec`` with random weights once, with diffusers' own classes, in both layouts."""
    folder, single = model_paths(spec)
    if not (folder / "model_index.json").exists():
        _save_diffusers_model(spec, folder)
    if not single.exists():
        from ldm.loading import load_components, save_single_file

        save_single_file(load_components(folder), single)
    return folder, single


def _save_diffusers_model(spec: ModelSpec, folder: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=spec.image_size // 8,
        block_out_channels=spec.unet_widths,
        cross_attention_dim=spec.text_width,
        attention_head_dim=8,  # diffusers' name for SD 1.x's 8 heads per level
    )
    vae = AutoencoderKL(
        block_out_channels=spec.vae_widths,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_widths),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_widths),
        layers_per_block=2,
        latent_channels=4,
        sample_size=spec.image_size,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=spec.text_width,
            intermediate_size=spec.text_width * 4,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            projection_dim=spec.text_width,
            hidden_act="quick_gelu",
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(REPO_DIR / "ldm" / "assets" / "clip_tokenizer")
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    tmp = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)


# --- measurement inside a worker process ------------------------------------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_mib() -> float:
    """Peak resident memory since the last ``reset_peak`` (or process start)."""
    return _status_kib("VmHWM") / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def available_bytes() -> int:
    """The memory the machine can still give (``MemAvailable``: free plus reclaimable page cache); 0 if unknown."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; peak memory over the timed runs."""
    for _ in range(warmup):
        fn()
    before = rss_mib()
    reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    peak = peak_mib()
    return {"times": times, "median_s": statistics.median(times), "peak_mib": peak, "rss_before_mib": before,
            "peak_increase_mib": peak - before}  # fmt: skip


def worker_setup() -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)


def worker_main(run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Entry point of a worker: ``script.py --worker '<json args>'`` prints ``run(args)`` as JSON."""
    worker_setup()
    args = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    result = run(args)
    print(json.dumps(result), flush=True)


def run_worker(
    script: str, args: dict[str, Any], timeout: float = 7200, python: str = sys.executable
) -> dict[str, Any]:
    """Run ``benchmarks/<script>`` as a worker process and return its JSON answer; ``python``: another
    environment's interpreter, for a runtime that cannot be installed beside ldm's dependencies."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "PYTHONPATH": f"{REPO_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    proc = subprocess.run(
        [python, str(BENCH_DIR / script), "--worker", json.dumps(args)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_DIR,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {args.get('impl')} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(
    script: str, args: dict[str, Any], rounds: int, impls: tuple[str, ...] = ("ldm", "diffusers"),
    before: Callable[[], None] | None = None,
) -> dict[str, list[dict]]:
    """Run each implementation ``rounds`` times, alternating the order (ABBA...) against drift in machine load;
    ``before()`` runs before each process starts (e.g. to wait for memory or warm the page cache)."""
    results: dict[str, list[dict]] = {impl: [] for impl in impls}
    for r in range(rounds):
        order = impls if r % 2 == 0 else impls[::-1]
        for impl in order:
            if before is not None:
                before()
            results[impl].append(run_worker(script, {**args, "impl": impl}))
    return results


def pooled(runs: list[dict], key: str = "times") -> float:
    """Median over every timed run of every process."""
    return statistics.median(t for run in runs for t in run[key])


def max_of(runs: list[dict], key: str) -> float:
    return max(run[key] for run in runs)


# --- FLOPs and the machine's matrix-multiply rate ---------------------------------------------------------


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (2 per multiply-add) of matmuls, convolutions and attention that ``fn`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(n: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of an n x n x n fp32 matrix product on ``THREADS`` threads (median of ``repeats`` after a
    warm-up), the faster of torch's two CPU routes to it: ``torch.mm`` (the BLAS GEMM, MKL) and the same
    product as a 1x1 convolution (oneDNN), as ``ldm.kernels.linear`` computes it. On AMD CPUs
    MKL runs its AVX2 code while oneDNN uses AVX-512, so either may be the machine's real rate."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    rows = a.view(1, n, 1, n).permute(0, 3, 1, 2)  # a's rows as the pixels of a channels-last map
    weight = b.t().contiguous()[:, :, None, None]  # (out, in, 1, 1): the map times b
    products = (lambda: torch.mm(a, b, out=out), lambda: torch.nn.functional.conv2d(rows, weight))
    best = min(measure(product, warmup=1, repeats=repeats)["median_s"] for product in products)
    return 2 * n**3 / best / 1e9


# --- results ---------------------------------------------------------------------------------------

def cpu_info() -> dict[str, Any]:
    """The CPU's model name and its vector / matrix flags (AVX-512, AVX-512 BF16, AMX), as ldm reads them
    to choose its kernels (``ldm.kernels.cpu.this_cpu``)."""
    from ldm.kernels.cpu import this_cpu

    cpu = this_cpu()
    return {"model": cpu.model, "cores": os.cpu_count(), "flags": list(cpu.flags)}



def save_results(name: str, spec: ModelSpec, payload: dict[str, Any]) -> Path:
    """Write ``results/<name>-<spec>.json`` (latest) and a timestamped copy."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "spec": asdict(spec),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "torch": torch.__version__,
        "threads": THREADS,
        "cpu": cpu_info(),
        **payload,
    }
    text = json.dumps(record, indent=2)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS_DIR / "history").mkdir(exist_ok=True)
    (RESULTS_DIR / "history" / f"{name}-{spec.name}-{stamp}.json").write_text(text)
    latest = RESULTS_DIR / f"{name}-{spec.name}.json"
    latest.write_text(text)
    return latest


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("nan")


@contextlib.contextmanager
def busy_core(argv: list[str]) -> Iterator[bool]:
    """With ``--busy-core`` in ``argv``: another process keeps one core busy (a Python loop that never sleeps)
    while the block runs, as on a user's machine where something else is running. Yields whether it does."""
    if "--busy-core" not in argv:
        yield False
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield True
    finally:
        spinner.kill()
        spinner.wait()


def spec_from_argv(argv: list[str]) -> ModelSpec:
    """``--quick``, ``--sd15-256`` or (default) the full-size spec."""
    return QUICK if "--quick" in argv else SD15_256 if "--sd15-256" in argv else FULL
