"""The server measured (issue 21): its overhead per image, a loopback load test and a soak.

    python benchmarks/serve.py                          # all three parts on the default model (4 to 15 min on 2 shared cores)
    python benchmarks/serve.py --quick                  # a smoke run: fewer repeats, clients and generations
    python benchmarks/serve.py --parts overhead,load    # some parts; the others keep their last results
    python benchmarks/serve.py --lora-dir DIR --lora NAME   # the soak's LoRA (default: a random one it writes)

Each part starts its own ``ldm serve`` process (``python -m ldm serve --port 0``, the default model: no
``--model``) with the benchmarks' thread count (``OMP_NUM_THREADS`` = ``MKL_NUM_THREADS`` = ``common.THREADS``,
torch's intra-op threads follow them), waits for uvicorn's "running on" line and talks to it over loopback HTTP.

- **overhead**: one txt2img request (fixed seed, the default model's own size, steps, guidance and sampler) timed
  by the client through ``POST /sdapi/v1/txt2img`` (base64 PNG answer parsed), against ``Pipeline.from_pretrained()``
  + ``pipe(prompt, seed=...)`` + the PNG with its infotext, timed in another process with the same thread count.
  Both are loaded and warmed up once; then the two alternate (AB BA AB ...) so that the load of a shared
  machine falls on both alike; the medians and their ratio are reported (target: server <= 1.05 x direct). The
  two images must be equal (pixels, and the PNG files byte for byte: the same infotext chunk).
- **load**: ``clients`` threads send ``requests`` requests each at once: txt2img and img2img (a base64 init
  image) with a unique prompt and a fixed seed each, ``GET /sdapi/v1/progress`` polls, and one client sends one
  ``POST /sdapi/v1/interrupt`` half-way. The queue is small (``--queue-size 4``) so that 429s happen; a client
  waits ``Retry-After`` seconds and sends the same request again (a 429 retried is not a lost request).
  Reported: requests answered, 429s, errors (5xx, 4xx other than 429, connection errors), p50/p95 latency from the
  first try to the answer, and every answer checked as its own: ``info``'s seeds and prompts, and the PNG's
  infotext, equal to what that client sent. Target: none lost, no 5xx, every answer its own.
- **soak**: ``generations`` txt2img requests to one server process, one after the other, cycling sizes (48 to 80
  pixels a side), every sampler the server lists (A1111 names, one with the Karras schedule), steps and an
  occasional batch of 2; the server's resident memory (``VmRSS`` of ``/proc/<pid>/status``) is read after each.
  Reported: RSS after generation 20, at the end, and the largest drift from it after 20 (target: within 5 %).
  Every other prompt carries ``<lora:NAME:0.8>`` for a LoRA in the server's ``--loras-dir``: by default a
  small random LoRA for the default model that this script writes in the cache, so the server switches it on
  and off. The report counts the tagged generations whose infotext names the LoRA (all should), and says the
  LoRA half is not measured when none does (a server that treated the tag as text).

Results: ``results/serve-ldm-shapes.json`` (``--quick``: ``serve-ldm-shapes-quick.json``) with the CPU model and
flags (``common.cpu_info``) and the 1-minute load average before and after each part.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPT = "a red circle on a blue background"
SEED = 1234
OVERHEAD_TARGET = 1.05  # server time per image over the direct call's
RSS_DRIFT_TARGET = 0.05  # of the RSS after the soak's first ``RSS_BASELINE`` generations
RSS_BASELINE = 20
LOAD_QUEUE_SIZE = 4  # with 8 clients and one running job, some requests find the queue full
# Each client's requests in order (cut to --quick's count); one client's second progress poll is the interrupt.
LOAD_KINDS = ("txt2img", "progress", "img2img", "txt2img", "img2img", "progress", "txt2img", "img2img", "txt2img", "txt2img")
LOAD_SAMPLERS = ("DPM++ 2M", "Euler a", "Euler")
# Small enough that 200 generations take minutes on 2 shared cores; the model's own size is 64x64.
SOAK_SIZES = ((64, 64), (48, 48), (80, 80), (64, 80), (80, 64), (48, 80), (48, 64))
SOAK_STEPS = (3, 4, 5)
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "diamond")
CACHE = common.CACHE_DIR / "serve"


@dataclass(frozen=True)
class Plan:
    """How much each part does."""

    overhead_rounds: int  # timed requests of each kind (server, direct), alternated
    clients: int  # load: concurrent client threads
    requests: int  # load: requests per client
    load_steps: int  # load: steps of each txt2img / img2img (small: the load test is about the server)
    generations: int  # soak: generations in one server process


FULL = Plan(overhead_rounds=15, clients=8, requests=10, load_steps=4, generations=200)
QUICK = Plan(overhead_rounds=2, clients=4, requests=3, load_steps=4, generations=30)


# --- the two processes measured --------------------------------------------------------------------------


def thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(common.THREADS), "MKL_NUM_THREADS": str(common.THREADS),
            "PYTHONPATH": f"{common.REPO_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip


class ServerProcess:
    """``python -m ldm serve --port 0 ARGS`` (the default model); its URL from uvicorn's log line, its RSS from /proc."""

    def __init__(self, *args: str, log: Path, timeout: float = 300):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log
        self._log = log.open("w")
        command = [sys.executable, "-m", "ldm", "serve", "--port", "0", *args]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=thread_env(), cwd=common.REPO_DIR)
        deadline = time.monotonic() + timeout
        while (found := re.search(r"Uvicorn running on (http://\S+)", log.read_text())) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ldm serve did not start (exit code {self.process.returncode}):\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        self.url = found.group(1)

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024

    def tracebacks(self) -> int:
        """Tracebacks in the server's log: every bug it met, answered or not."""
        return self.log_path.read_text().count("Traceback")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class DirectProcess:
    """This script as ``--direct-worker``: the default ``Pipeline`` loaded once, one JSON line in and out per image."""

    def __init__(self, log: Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("w")
        command = [sys.executable, __file__, "--direct-worker"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                        text=True, env=thread_env(), cwd=common.REPO_DIR)  # fmt: skip

    def generate(self, prompt: str, seed: int) -> dict[str, Any]:
        self.process.stdin.write(json.dumps({"prompt": prompt, "seed": seed}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the direct worker stopped:\n{Path(self._log.name).read_text()[-3000:]}")
        return json.loads(line)

    def __enter__(self) -> DirectProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self._log.close()


def direct_worker() -> None:
    """Load the default model; per input line, time ``pipe(prompt, seed=seed)`` and the PNG as the server writes it.

    The pipeline is set up as the server's (``weights_after_use="keep"``, ``ldm.server.engine``) and called
    on one thread of its own, as the server's job worker calls it: on the shared 2-core machine the same
    call on the main thread measured 2-10x slower than on a second thread (how the OpenMP teams of the two
    threads are scheduled beside other work), which would flatter the server.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from ldm import Pipeline
    from ldm.images import parameters_chunk

    common.worker_setup()
    pipe = Pipeline.from_pretrained().configure(weights_after_use="keep")

    def generate(prompt: str, seed: int) -> dict[str, Any]:
        began = time.perf_counter()
        output = pipe(prompt, seed=seed)
        parameters = output.settings.parameters()[0]
        buffer = io.BytesIO()
        output.images[0].save(buffer, format="PNG", pnginfo=parameters_chunk(parameters))
        seconds = time.perf_counter() - began
        png = buffer.getvalue()
        return {"seconds": seconds, "png_sha256": hashlib.sha256(png).hexdigest(), "pixels_sha256": pixels_sha256(png),
                "parameters": asdict(parameters), "threads": torch.get_num_threads()}  # fmt: skip

    with ThreadPoolExecutor(max_workers=1) as worker:
        for line in sys.stdin:
            request = json.loads(line)
            print(json.dumps(worker.submit(generate, request["prompt"], request["seed"]).result()), flush=True)


def pixels_sha256(png: bytes) -> str:
    with Image.open(io.BytesIO(png)) as image:
        return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def load_average() -> float:
    return os.getloadavg()[0]


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), linear between the nearest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- overhead ---------------------------------------------------------------------------------------------


def overhead(plan: Plan) -> dict[str, Any]:
    """Client-side seconds per image through ``/sdapi/v1/txt2img`` against ``Pipeline`` in a process, alternated."""
    with DirectProcess(CACHE / "direct.log") as direct, ServerProcess(log=CACHE / "server-overhead.log") as server, \
            httpx.Client(base_url=server.url, timeout=600) as client:  # fmt: skip
        warm = direct.generate(PROMPT, SEED)  # its parameters: the default model's own size, steps, guidance, sampler
        p = warm["parameters"]
        body = {"prompt": PROMPT, "negative_prompt": p["negative_prompt"], "seed": SEED, "steps": p["steps"],
                "cfg_scale": p["cfg_scale"], "width": p["width"], "height": p["height"], "sampler_name": p["sampler"]}  # fmt: skip
        served = [txt2img_timed(client, body)]  # the warm-up, untimed, and the first image to compare
        timed: dict[str, list[dict]] = {"server": [], "direct": []}
        for r in range(plan.overhead_rounds):
            for kind in ("server", "direct") if r % 2 == 0 else ("direct", "server"):
                timed[kind].append(txt2img_timed(client, body) if kind == "server" else direct.generate(PROMPT, SEED))
        served += timed["server"]
        tracebacks = server.tracebacks()
    server_s = [t["seconds"] for t in timed["server"]]
    direct_s = [t["seconds"] for t in timed["direct"]]
    pairs = [s / d for s, d in zip(server_s, direct_s)]
    ratio = statistics.median(server_s) / statistics.median(direct_s)
    return {
        "request": body,
        "direct_threads": warm["threads"],
        "server_seconds": server_s,
        "direct_seconds": direct_s,
        "server_median_s": statistics.median(server_s),
        "direct_median_s": statistics.median(direct_s),
        "ratio": ratio,
        "paired_ratio_median": statistics.median(pairs),
        "overhead_ms": (statistics.median(server_s) - statistics.median(direct_s)) * 1000,
        "target_ratio": OVERHEAD_TARGET,
        "met": ratio <= OVERHEAD_TARGET,
        "same_pixels": all(s["pixels_sha256"] == warm["pixels_sha256"] for s in served + timed["direct"]),
        "same_png_bytes": all(s["png_sha256"] == warm["png_sha256"] for s in served + timed["direct"]),
        "server_tracebacks": tracebacks,
    }


def txt2img_timed(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """Seconds from sending the request to its parsed JSON answer, and the hashes of the image it carried."""
    began = time.perf_counter()
    response = client.post("/sdapi/v1/txt2img", json=body)
    answer = response.json()
    seconds = time.perf_counter() - began
    response.raise_for_status()
    png = base64.b64decode(answer["images"][0])
    return {"seconds": seconds, "png_sha256": hashlib.sha256(png).hexdigest(), "pixels_sha256": pixels_sha256(png)}


# --- load -------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request of the load test, as its client saw it."""

    client: int
    index: int
    kind: str
    status: int | None = None  # the last answer's status; None: no answer (a connection error)
    retries: int = 0  # 429s answered before it
    seconds: float = 0.0  # first try to the last answer
    error: str | None = None  # a lost request: 5xx, a 4xx other than 429, a connection error
    mismatch: str | None = None  # an answer that is not the request's own
    images: int = 0


def generation_body(kind: str, client: int, index: int, steps: int, init_image: str) -> dict[str, Any]:
    """A request with its own prompt and seed (unique over the whole test)."""
    colour, ground = COLOURS[(client + index) % 8], COLOURS[(client + 3 * index + 1) % 8]
    body = {
        "prompt": f"a {colour} {SHAPES[index % 4]} on a {ground} background, client {client} request {index}",
        "seed": 100_000 + 1000 * client + index, "steps": steps, "cfg_scale": 3.0, "width": 64, "height": 64,
        "sampler_name": LOAD_SAMPLERS[(client + index) % len(LOAD_SAMPLERS)],
    }  # fmt: skip
    if kind == "img2img":
        body.update(init_images=[init_image], denoising_strength=0.6)
    return body


def check_own(answer: dict[str, Any], body: dict[str, Any]) -> str | None:
    """What in an answer is not its request's own (seeds, prompts, the PNG's infotext, size); None if all is."""
    from ldm.images import parse_parameters

    info = json.loads(answer["info"])
    prompt, seed = body["prompt"], body["seed"]
    if info["prompt"] != prompt or info["all_prompts"] != [prompt]:
        return f"info prompts {info['all_prompts']!r}, sent {prompt!r}"
    if info["seed"] != seed or info["all_seeds"] != [seed]:
        return f"info seeds {info['all_seeds']}, sent {seed}"
    for text in answer["images"]:
        with Image.open(io.BytesIO(base64.b64decode(text))) as image:
            written = parse_parameters(image.info["parameters"])
            size = image.size
        if (written.prompt, written.seed) != (prompt, seed):
            return f"PNG infotext has prompt {written.prompt!r} seed {written.seed}, sent {prompt!r} seed {seed}"
        if size != (body["width"], body["height"]):
            return f"image is {size}, asked {body['width']}x{body['height']}"
    return None


def load(plan: Plan) -> dict[str, Any]:
    """``plan.clients`` threads x ``plan.requests`` requests against one server with a small queue."""
    canvas = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(canvas).ellipse((16, 16, 48, 48), fill=(200, 30, 30))
    init_image = png_base64(canvas)
    interrupter, interrupt_at = plan.clients // 2, LOAD_KINDS.index("progress", 2) if plan.requests > 5 else 1
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = threading.Barrier(plan.clients)

    with ServerProcess("--queue-size", str(LOAD_QUEUE_SIZE), log=CACHE / "server-load.log") as server:

        def client_thread(c: int) -> None:
            with httpx.Client(base_url=server.url, timeout=600) as client:
                start.wait()
                for i in range(plan.requests):
                    kind = "interrupt" if (c, i) == (interrupter, interrupt_at) else LOAD_KINDS[i]
                    outcome = request_once(client, c, i, kind, plan.load_steps, init_image)
                    with lock:
                        outcomes.append(outcome)

        began = time.perf_counter()
        threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(plan.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        tracebacks = server.tracebacks()

    generations = [o for o in outcomes if o.kind in ("txt2img", "img2img")]
    answered = [o for o in outcomes if o.status == 200 and o.error is None]
    latencies = [o.seconds for o in generations if o.status == 200]
    # The interrupted job (whichever ran) may answer with no image, as A1111's does when stopped before a step.
    empty = [o for o in generations if o.status == 200 and o.images == 0]
    return {
        "clients": plan.clients, "requests_per_client": plan.requests, "queue_size": LOAD_QUEUE_SIZE,
        "steps": plan.load_steps, "size": "64x64",
        "requests": len(outcomes), "by_kind": {k: sum(o.kind == k for o in outcomes) for k in ("txt2img", "img2img", "progress", "interrupt")},
        "completed": len(answered), "lost": len(outcomes) - len(answered),
        "status_429": sum(o.retries for o in outcomes), "requests_retried": sum(o.retries > 0 for o in outcomes),
        "errors": [asdict(o) for o in outcomes if o.error is not None],
        "server_errors_5xx": sum(o.status is not None and o.status >= 500 for o in outcomes),
        "mismatches": [asdict(o) for o in outcomes if o.mismatch is not None],
        "answers_without_image": len(empty),
        "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
        "latency_max_s": max(latencies, default=None),
        "progress_latency_p50_s": percentile([o.seconds for o in outcomes if o.kind == "progress"], 50),
        "progress_latency_p95_s": percentile([o.seconds for o in outcomes if o.kind == "progress"], 95),
        "wall_s": wall, "images_per_s": sum(o.images for o in generations) / wall,
        "server_tracebacks": tracebacks,
        "met": len(answered) == len(outcomes) and not any(o.mismatch for o in outcomes) and len(empty) <= 1,
    }  # fmt: skip


def request_once(client: httpx.Client, c: int, i: int, kind: str, steps: int, init_image: str) -> Outcome:
    """Send one request until it is answered other than 429 (waiting ``Retry-After`` after each 429)."""
    outcome = Outcome(c, i, kind)
    body = generation_body(kind, c, i, steps, init_image) if kind in ("txt2img", "img2img") else None
    began = time.perf_counter()
    while True:
        try:
            if kind == "progress":
                response = client.get("/sdapi/v1/progress", params={"skip_current_image": "false"})
            elif kind == "interrupt":
                response = client.post("/sdapi/v1/interrupt")
            else:
                response = client.post(f"/sdapi/v1/{kind}", json=body)
        except httpx.HTTPError as error:
            outcome.error = f"{type(error).__name__}: {error}"
            break
        outcome.status = response.status_code
        if response.status_code != 429:
            break
        outcome.retries += 1
        time.sleep(float(response.headers.get("Retry-After", "1")))
    outcome.seconds = time.perf_counter() - began
    if outcome.error is None and outcome.status != 200:
        outcome.error = f"HTTP {outcome.status}: {response.text[:300]}"
    elif outcome.error is None and body is not None:
        answer = response.json()
        outcome.images = len(answer["images"])
        outcome.mismatch = check_own(answer, body)
    elif outcome.error is None and kind == "progress":
        answer = response.json()
        if not {"progress", "eta_relative", "state"} <= answer.keys():
            outcome.mismatch = f"progress answer without its fields: {sorted(answer)}"
    return outcome


# --- soak -------------------------------------------------------------------------------------------------


def write_random_lora(path: Path) -> Path:
    """A rank-4 LoRA on the default model's U-Net attention projections with random weights (``ldm.adapters.save_lora``)."""
    if path.exists():
        return path
    import torch

    from ldm import Pipeline
    from ldm.adapters.training import UNET_TARGETS, add_adapters, save_lora

    pipe = Pipeline.from_pretrained()
    unet = add_adapters(pipe.unet, UNET_TARGETS, rank=4, alpha=4.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:  # add_adapters starts up at zero: the adapted model would equal the base
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lora(path, unet)
    Pipeline.from_pretrained().load_lora(path, 0.8)  # it loads: the file is one ldm applies
    return path


def names_lora(infotext: str) -> bool:
    """Whether an infotext's settings line names a LoRA (ldm's ``Lora: name: w``, A1111's ``Lora hashes``), not its prompt."""
    from ldm.images import parse_parameters

    return any("lora" in key.lower() for key in parse_parameters(infotext).extra)


def soak(plan: Plan, lora_dir: Path | None, lora: str | None) -> dict[str, Any]:
    """``plan.generations`` mixed txt2img requests to one server process; its RSS after each."""
    if lora is None and lora_dir is None:
        lora_dir, lora = CACHE / "loras", write_random_lora(CACHE / "loras" / "ldm-shapes-random.safetensors").stem
    lora_args = ("--loras-dir", str(lora_dir)) if lora_dir is not None else ()
    rss: list[float] = []
    failures: list[dict[str, Any]] = []
    tagged = applied = 0
    with ServerProcess(*lora_args, log=CACHE / "server-soak.log") as server, httpx.Client(base_url=server.url, timeout=600) as client:
        rss_loaded = server.rss_mib()
        samplers = [s["name"] for s in client.get("/sdapi/v1/samplers").json()] + ["DPM++ 2M Karras"]
        listed = [item["name"] for item in client.get("/sdapi/v1/loras").json()]
        began = time.perf_counter()
        for g in range(plan.generations):
            width, height = SOAK_SIZES[g % len(SOAK_SIZES)]
            with_lora = lora is not None and g % 2 == 1
            body = {
                "prompt": f"a {COLOURS[g % 8]} {SHAPES[g % 4]} on a {COLOURS[(g + 3) % 8]} background, soak {g}"
                          + (f" <lora:{lora}:0.8>" if with_lora else ""),
                "seed": 200_000 + g, "steps": SOAK_STEPS[g % len(SOAK_STEPS)], "cfg_scale": 3.0, "width": width,
                "height": height, "sampler_name": samplers[g % len(samplers)], "batch_size": 2 if g % 10 == 9 else 1,
            }  # fmt: skip
            response = client.post("/sdapi/v1/txt2img", json=body)
            if response.status_code != 200:
                failures.append({"generation": g, "status": response.status_code, "body": response.text[:300], "request": body})
            else:
                info = json.loads(response.json()["info"])
                if info["all_seeds"] != [body["seed"] + i for i in range(body["batch_size"])]:
                    failures.append({"generation": g, "mismatch": f"seeds {info['all_seeds']}", "request": body})
                tagged += with_lora
                applied += with_lora and any(names_lora(text) for text in info["infotexts"])
            rss.append(server.rss_mib())
        wall = time.perf_counter() - began
        tracebacks = server.tracebacks()
    baseline = rss[min(RSS_BASELINE, len(rss)) - 1]
    after = rss[RSS_BASELINE:] or [baseline]
    drift = max(abs(r - baseline) for r in after) / baseline
    return {
        "generations": plan.generations, "samplers": samplers, "sizes": [f"{w}x{h}" for w, h in SOAK_SIZES],
        "steps": list(SOAK_STEPS), "failures": failures, "server_tracebacks": tracebacks, "wall_s": wall,
        "rss_loaded_mib": rss_loaded, "rss_after_baseline_mib": baseline, "rss_end_mib": rss[-1], "rss_max_mib": max(rss),
        "baseline_generation": RSS_BASELINE, "rss_max_drift": drift, "rss_end_drift": (rss[-1] - baseline) / baseline,
        "target_drift": RSS_DRIFT_TARGET, "met": drift <= RSS_DRIFT_TARGET and not failures, "rss_mib": rss,
        "lora": {"name": lora, "dir": str(lora_dir) if lora_dir else None, "listed_by_server": lora in listed,
                 "tagged_generations": tagged, "applied_generations": applied, "measured": applied > 0,
                 "note": None if applied else "no tagged generation applied the LoRA (its infotext does not name it), "
                 "so the LoRA on/off half of the soak is not measured"},
    }  # fmt: skip


# --- the run ----------------------------------------------------------------------------------------------


def model_spec(plan: Plan, quick: bool) -> common.ModelSpec:
    """The default model as a ``common.ModelSpec`` (read from its configs), for ``common.save_results``."""
    from ldm.loading import DEFAULT_MODEL_DIR
    from ldm.settings import DEFAULT_STEPS

    folder = Path(DEFAULT_MODEL_DIR)
    unet, vae, text = (json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae", "text_encoder"))
    return common.ModelSpec(
        "ldm-shapes-quick" if quick else "ldm-shapes", tuple(unet["block_out_channels"]), tuple(vae["block_out_channels"]),
        text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
        unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1), DEFAULT_STEPS, (), plan.overhead_rounds, model="ldm-shapes",
    )  # fmt: skip


def table(results: dict[str, Any]) -> str:
    rows = []
    if "overhead" in results:
        o = results["overhead"]
        rows.append(f"overhead  server {o['server_median_s']:.3f} s/image, direct Pipeline {o['direct_median_s']:.3f} s/image, "
                    f"ratio {o['ratio']:.3f} (paired {o['paired_ratio_median']:.3f}; target <= {o['target_ratio']}: "
                    f"{'met' if o['met'] else 'NOT met'}); same pixels {o['same_pixels']}, same PNG bytes {o['same_png_bytes']}")  # fmt: skip
    if "load" in results:
        lo = results["load"]
        rows.append(f"load      {lo['clients']} clients x {lo['requests_per_client']}: {lo['completed']}/{lo['requests']} answered, "
                    f"{lo['status_429']} x 429 (retried), {len(lo['errors'])} errors, {lo['server_errors_5xx']} 5xx, "
                    f"{len(lo['mismatches'])} not their own; p50 {lo['latency_p50_s']:.2f} s, p95 {lo['latency_p95_s']:.2f} s "
                    f"({'met' if lo['met'] else 'NOT met'})")  # fmt: skip
    if "soak" in results:
        s = results["soak"]
        rows.append(f"soak      {s['generations']} generations, {len(s['failures'])} failed: RSS {s['rss_after_baseline_mib']:.0f} MiB "
                    f"after {s['baseline_generation']}, {s['rss_end_mib']:.0f} MiB at the end, max drift {100 * s['rss_max_drift']:.2f} % "
                    f"(target <= {100 * s['target_drift']:.0f} %: {'met' if s['met'] else 'NOT met'}); LoRA: "
                    f"{s['lora']['applied_generations']}/{s['lora']['tagged_generations']} applied"
                    + ("" if s["lora"]["measured"] else " (not measured: no tagged generation applied the LoRA)"))  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="overhead,load,soak", help="comma-separated: overhead, load, soak")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer repeats, clients and generations")
    parser.add_argument("--lora-dir", type=Path, help="the soak server's --loras-dir (default: the cache's random LoRA)")
    parser.add_argument("--lora", help="the LoRA (a file stem in --lora-dir) that every other soak prompt names")
    parser.add_argument("--direct-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.direct_worker:
        direct_worker()
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(parts) - {"overhead", "load", "soak"}:
        parser.error(f"unknown --parts {', '.join(sorted(unknown))}; choose from overhead, load, soak")
    if (args.lora_dir is None) != (args.lora is None):
        parser.error("--lora-dir and --lora go together")
    plan = QUICK if args.quick else FULL
    spec = model_spec(plan, args.quick)
    latest = common.RESULTS_DIR / f"serve-{spec.name}.json"
    kept = json.loads(latest.read_text()) if latest.exists() else {}
    results = {part: kept[part] for part in ("overhead", "load", "soak") if part in kept and part not in parts}
    for part in parts:
        before = load_average()
        began = time.perf_counter()
        print(f"{part} ...", flush=True)
        result = overhead(plan) if part == "overhead" else load(plan) if part == "load" else soak(plan, args.lora_dir, args.lora)
        result.update(measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"), part_wall_s=time.perf_counter() - began,
                      load_average_1min_before=before, load_average_1min_after=load_average())  # fmt: skip
        results[part] = result
        print(table({part: result}), flush=True)
    path = common.save_results("serve", spec, {"plan": asdict(plan), **results})
    print(f"\n{table(results)}\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
