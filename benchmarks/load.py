"""Load time and peak memory: ldm vs diffusers on a full-size SD 1.5 single file.

Writes a random-weight SD 1.5-shaped original-layout ``.safetensors`` once to a cache
folder (default ``$TMPDIR/ldm-bench-load``), then loads it in fresh subprocesses:

- ldm: ``ldm.loading.load_components(path, dtype=...)``;
- diffusers: ``StableDiffusionPipeline.from_single_file(path, config=<local config folder>,
  local_files_only=True, torch_dtype=...)``, offline (the config folder holds only the
  component configs and the tokenizer).

Each child reports wall time of the load call, the time until every weight is paged in (ldm's tensors may be lazy views of the
memory-mapped file), and peak RSS (``ru_maxrss``), also relative to the RSS after imports. The timed load
starts after the imports (transformers' CLIP model code included for both: diffusers' pipeline import
brings it in, ldm imports it lazily), whose time is printed apart. ``--quick`` uses a smaller SD 1.x-shaped model.

    python benchmarks/load.py [--quick] [--dtype fp16|fp32] [--cache DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def _configs(quick: bool):
    from ldm.models import UNetConfig, VAEConfig
    from ldm.models.text_encoder import clip_config

    if not quick:
        return UNetConfig.sd1(), VAEConfig.sd(), clip_config("sd1")
    # SD 1.x conventions (8 heads, 64-wide CLIP heads, 32 groups) at ~1/10 of the size.
    unet = UNetConfig(block_out_channels=(128, 256, 384, 384), cross_attention_dim=384)
    vae = VAEConfig(block_out_channels=(64, 128, 256, 256))
    text = clip_config("sd1")
    text.update(dict(hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_hidden_layers=6))
    return unet, vae, text


def write_checkpoint(cache: Path, quick: bool, dtype: torch.dtype) -> tuple[Path, Path]:
    """The random-weight single file and a diffusers config-only folder (both cached)."""
    from transformers import CLIPTextModel

    from ldm.io import atomic_write
    from ldm.loading.single_file import single_file_state
    from ldm.models import AutoencoderKL, UNet
    from ldm.models.text_encoder import load_tokenizer
    from ldm.schedulers import SchedulerConfig

    name = f"sd15-{'quick' if quick else 'full'}-{str(dtype).removeprefix('torch.')}"
    path, config_dir = cache / f"{name}.safetensors", cache / f"{name}-config"
    unet_config, vae_config, text_config = _configs(quick)
    if not config_dir.exists():
        for sub in ("unet", "vae", "text_encoder", "scheduler"):
            (config_dir / sub).mkdir(parents=True, exist_ok=True)
        (config_dir / "unet" / "config.json").write_text(json.dumps(unet_config.to_diffusers()))
        (config_dir / "vae" / "config.json").write_text(json.dumps(vae_config.to_diffusers()))
        text_config.architectures = ["CLIPTextModel"]
        text_config.to_json_file(config_dir / "text_encoder" / "config.json")
        (config_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(SchedulerConfig().to_diffusers()))
        load_tokenizer("sd1").save_pretrained(config_dir / "tokenizer")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        (config_dir / "model_index.json").write_text(json.dumps(index))
    if path.exists():
        return path, config_dir
    with torch.device("meta"):
        models = SimpleNamespace(
            unet=UNet(unet_config),
            vae=AutoencoderKL(vae_config),
            text_encoder=CLIPTextModel(text_config),
            family="sd1",
            scheduler_config=SchedulerConfig(),
        )
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, meta in single_file_state(models).items():
        if meta.is_floating_point():
            state[key] = (torch.randn(meta.shape, generator=generator) * 0.02).to(dtype)
        else:
            state[key] = torch.arange(meta.shape[-1]).expand(meta.shape).contiguous()

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(state, str(tmp), {"format": "pt"})

    atomic_write(path, write)
    return path, config_dir


def child(which: str, path: str, config_dir: str, dtype_name: str) -> None:
    """Runs in a fresh process: import, load once, print one JSON line."""
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    imports = time.perf_counter()
    if which == "ldm":
        # diffusers' pipeline import below brings in transformers' CLIP model code; ldm imports it lazily,
        # inside the load, so that VAE-only work never does. Importing it here makes both timed loads do
        # the same work; ``import_s`` shows what each library's imports cost.
        import transformers.models.clip.modeling_clip  # noqa: F401

        from ldm.loading import load_components

        def load():
            return load_components(path, dtype=dtype)
    else:
        from diffusers import StableDiffusionPipeline

        def load():
            return StableDiffusionPipeline.from_single_file(
                path, config=config_dir, local_files_only=True, torch_dtype=dtype
            )

    imports = time.perf_counter() - imports
    before = _peak_rss_mb()
    start = time.perf_counter()
    loaded = load()
    seconds = time.perf_counter() - start
    checksum = touch_weights((loaded.unet, loaded.vae, loaded.text_encoder))
    ready = time.perf_counter() - start
    peak = _peak_rss_mb()
    result = {"import_s": imports, "seconds": seconds, "ready": ready, "peak_mb": peak, "load_mb": peak - before}
    print(json.dumps({**result, "checksum": checksum}))


def touch_weights(modules) -> float:
    """Touch every memory page of every weight of ``modules`` (a memory-mapped tensor counts in RSS only
    once paged in); every 1024th element is enough and makes no large temporaries. Returns their sum."""
    return sum(float(p.detach().reshape(-1)[::1024].float().sum()) for m in modules for p in m.parameters())


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss, in KiB on Linux).

    ru_maxrss survives fork+exec on Linux, so a child would report its parent's peak when that
    is higher; the VmHWM line of /proc/self/status starts afresh at exec and is used if present.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(which: str, path: Path, config_dir: Path, dtype_name: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, __file__, "--child", which, str(path), str(config_dir), dtype_name]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{which} load failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def warm_page_cache(path: Path, chunk: int = 64 * 2**20) -> None:
    with path.open("rb") as file:
        while file.read(chunk):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~10x smaller SD 1.x-shaped model")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="file and load precision")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ldm-bench-load")
    parser.add_argument("--repeats", type=int, default=1, help="loads per library, alternated (best time, max memory)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    path, config_dir = write_checkpoint(args.cache, args.quick, dtype)
    size_mb = path.stat().st_size / 2**20
    print(f"checkpoint: {path} ({size_mb:.0f} MiB, {args.dtype}), loading as {args.dtype}")
    # Both libraries load a file in the page cache, as a user's second run does; without this the
    # first child alone pays for reading the disk (a cold cache measured ldm at 1.15x diffusers).
    warm_page_cache(path)
    # Fresh processes, ldm and diffusers alternated, so a slow spell of a shared CPU hits both.
    runs_of = {"ldm": [], "diffusers": []}
    for _ in range(args.repeats):
        for which, runs in runs_of.items():
            runs.append(measure(which, path, config_dir, args.dtype))
    results = {}
    for which, runs in runs_of.items():
        if len({round(r["checksum"], 2) for r in runs}) != 1:
            raise SystemExit(f"{which} loaded different weights on repeats")
        results[which] = {
            "checksum": runs[0]["checksum"],
            "seconds": min(r["seconds"] for r in runs),
            "ready": min(r["ready"] for r in runs),
            "peak_mb": max(r["peak_mb"] for r in runs),
            "load_mb": max(r["load_mb"] for r in runs),
            "import_s": min(r["import_s"] for r in runs),
        }
        r = results[which]
        times = " ".join(f"{run['seconds']:.2f}" for run in runs)
        print(
            f"{which:>9}: {r['seconds']:6.2f} s load, {r['ready']:6.2f} s with every weight paged in   "
            f"peak RSS {r['peak_mb']:7.0f} MiB   (+{r['load_mb']:.0f} MiB during load)   "
            f"load times {times}   imports {r['import_s']:.2f} s"
        )
    ours, theirs = results["ldm"], results["diffusers"]
    if abs(ours["checksum"] - theirs["checksum"]) > 1e-3 * max(1.0, abs(theirs["checksum"])):
        raise SystemExit(f"ldm and diffusers loaded different weights ({ours['checksum']} vs {theirs['checksum']})")
    print(
        f"    ratio: time ldm/diffusers {ours['seconds'] / theirs['seconds']:.2f} "
        f"({ours['ready'] / theirs['ready']:.2f} paged in), "
        f"peak RSS ldm/diffusers {ours['peak_mb'] / theirs['peak_mb']:.2f}, "
        f"ldm load memory / file size {ours['load_mb'] / size_mb:.2f}"
    )


if __name__ == "__main__":
    main()
