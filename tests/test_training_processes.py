"""Runs in real processes: SIGKILL and --resume latest; two ranks under `accelerate launch` (gloo, CPU)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training_support import colour_folder, save_micro_model

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
COLOURS = {"zqx": (230, 20, 20), "a photo of a dog": (20, 20, 230), "grass": (20, 200, 20)}
# One thread per process: the runs share a small machine with other work.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The scripts that the tests launch as processes import this folder's helpers, as pytest lets the test modules do.
CHILD_ENV = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, (str(TESTS), os.environ.get("PYTHONPATH"))))}


def finetune_command(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ldm", "finetune", "--model", str(model), "--data", str(data), "--output", str(output),
            "--resolution", "32", "--batch-size", "2", "--learning-rate", "1e-3", "--random-flip", "--crop", "random",
            "--caption-dropout", "0.2", "--ema-decay", "0.9", "--gradient-accumulation-steps", "2",
            "--checkpointing-steps", "3", "--seed", "5", "--no-progress", *extra]


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(model, data, run folder) of a 12-step run that nothing interrupted."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    model = save_micro_model(folder / "model")
    data = colour_folder(folder / "data", COLOURS)
    reference = folder / "reference"
    subprocess.run(finetune_command(model, data, reference, "--max-steps", "12"), check=True, env=ENV, capture_output=True)
    return model, data, reference


def test_sigkill_then_resume_latest_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    model, data, reference = uninterrupted
    crashed = tmp_path / "crashed"
    process = subprocess.Popen(finetune_command(model, data, crashed, "--max-steps", "1000"), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = crashed / "checkpoints" / "checkpoint-000003"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert first.exists() and not (crashed / "model").exists()

    resumed = subprocess.run(finetune_command(model, data, crashed, "--max-steps", "12", "--resume", "latest"),
                             env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    expected, got = unet_weights(reference), unet_weights(crashed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    with open(crashed / "log.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == list(range(1, 13))  # each step logged once
    start = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(start[k], v) for k, v in got.items())


def test_ctrl_c_saves_the_current_step_exits_130_and_the_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    model, data, reference = uninterrupted
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(finetune_command(model, data, stopped, "--max-steps", "1000"), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = stopped / "checkpoints" / "checkpoint-000003"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("ldm finetune: interrupted at step ") and line.endswith("; continue with the same options and --resume latest")
    step = int(line.split("interrupted at step ")[1].split(";")[0])
    assert 3 <= step < 12, line  # the test needs the stop before the reference's last step
    assert f"saved {stopped / 'checkpoints' / f'checkpoint-{step:06d}'};" in line
    assert "Traceback" not in stderr

    resumed = subprocess.run(finetune_command(model, data, stopped, "--max-steps", "12", "--resume", "latest"),
                             env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    expected, got = unet_weights(reference), unet_weights(stopped)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


DISTRIBUTED_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from test_training_support import micro_models
from ldm.training import DataConfig, ImageCaptionDataset, TrainConfig, make_accelerator, scan_folder, train

class Recording(ImageCaptionDataset):
    seen = []
    def __getitem__(self, key):
        self.seen.append(key[1])
        return super().__getitem__(key)

data, output = Path(sys.argv[1]), Path(sys.argv[2])
config = TrainConfig(max_steps=4, batch_size=2, learning_rate=1e-3, seed=1, checkpointing_steps=2)
accelerator = make_accelerator(config)
data_config = DataConfig(resolution=32, random_flip=True)
dataset = Recording(scan_folder(data, data_config), data_config, seed=1)
result = train(micro_models(), dataset, config, output, accelerator=accelerator, show_progress=False)
rank = accelerator.process_index
save_file({{k: v.contiguous() for k, v in result.unet.state_dict().items()}}, str(output / f"rank{{rank}}.safetensors"))
(output / f"rank{{rank}}.json").write_text(json.dumps({{"seen": Recording.seen, "world": accelerator.num_processes}}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_accelerate_launch_split_data_and_agree(tmp_path):
    data = colour_folder(tmp_path / "data", COLOURS, per_caption=4)  # 12 images: 6 batches of 2
    script = tmp_path / "run.py"
    script.write_text(DISTRIBUTED_SCRIPT.format())
    output = tmp_path / "out"
    # accelerate 1.x's --cpu starts several processes only through MPI; its torchrun launcher
    # (--multi_gpu) with ACCELERATE_USE_CPU gives two CPU ranks on the gloo backend.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(script), str(data), str(output)]
    done = subprocess.run(command, env={**CHILD_ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((output / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    # 4 steps x 1 batch of 2 per rank: each rank reads 8 images, 12 images per epoch split between them.
    first_epoch = [set(r["seen"][:6]) for r in ranks]
    assert all(len(r["seen"]) == 8 for r in ranks)
    assert not first_epoch[0] & first_epoch[1]
    assert first_epoch[0] | first_epoch[1] == set(range(12))
    weights = [load_file(str(output / f"rank{r}.safetensors")) for r in range(2)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    state = json.loads((output / "checkpoints" / "checkpoint-000004" / "state.json").read_text())
    assert state["world_size"] == 2
    assert len(torch.load(output / "checkpoints" / "checkpoint-000004" / "rng.pt", weights_only=True)) == 2
