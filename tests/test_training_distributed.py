"""Sharded training state (FSDP2): gathering, resuming, EMA per shard, plain copies; refused back-ends.

accelerate 1.15 enables FSDP only for GPU-type devices (state.py: ``DistributedType.FSDP`` is set
only when the base type is MULTI_GPU/XPU/NPU/...; on CPU a ``--use_fsdp`` launch runs as MULTI_CPU,
i.e. DDP). So the loop cannot be run sharded on this machine through accelerate. What can run on
CPU is torch's own FSDP2 (``fully_shard`` on the gloo backend): the two-rank test below shards the
micro U-Net with it and drives the same functions the loop uses (``ldm.training.distributed`` and
``EMA``) through training steps, a checkpoint written and read with ``ldm.training.checkpoint``, a
resume into freshly sharded modules, and the plain copy the result is built from, comparing every
number with a one-process run on the whole batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training_support import MICRO_UNET, colour_folder, micro_models, one_torch_thread, save_micro_model  # noqa: F401 - autouse fixture

from ldm.adapters.training import UNET_TARGETS, add_adapters
from ldm.models import UNet
from ldm.training.distributed import gather_optimizer_state, load_optimizer_state, materialize, meta_skeleton, trainable_parameters

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The scripts that the tests launch as processes import this folder's helpers, as pytest lets the test modules do.
CHILD_ENV = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, (str(TESTS), os.environ.get("PYTHONPATH"))))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_meta_skeleton_holds_no_weights_and_materializes_an_equal_model():
    torch.manual_seed(0)
    unet = add_adapters(UNet(MICRO_UNET), UNET_TARGETS, 2, 2.0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_()  # peft starts B at zero; make the adapters matter
    skeleton = meta_skeleton(unet)
    assert all(p.is_meta for p in skeleton.parameters())
    assert [p.requires_grad for p in skeleton.parameters()] == [p.requires_grad for p in unet.parameters()]
    plain = materialize(skeleton, {k: v.clone() for k, v in unet.state_dict().items()})
    assert not any(p.is_meta for p in plain.parameters()) and all(p.is_meta for p in skeleton.parameters())
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(plain(sample, torch.tensor([3, 700]), context), unet(sample, torch.tensor([3, 700]), context))


def test_optimizer_state_is_saved_by_name_and_loads_into_a_reordered_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).square().sum().backward()
    optimizer.step()
    parameters = trainable_parameters({"m": model})
    saved = gather_optimizer_state(optimizer, {p: n for n, p in parameters.items()})
    assert set(saved["state"]) == {"m.0.weight", "m.0.bias", "m.1.weight", "m.1.bias"}
    assert saved["param_groups"][0]["params"] == list(parameters)
    # The same parameters in another order: positions differ, names match.
    reordered = torch.optim.AdamW(list(model.parameters())[::-1], lr=0.1)
    load_optimizer_state(reordered, saved, {p: n for n, p in parameters.items()})
    for p in model.parameters():
        assert torch.equal(reordered.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])
        assert torch.equal(reordered.state[p]["step"], optimizer.state[p]["step"])


SHARDED_SCRIPT = """
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from test_training_support import micro_models
from ldm.errors import ConfigError
from ldm.models.attention import SpatialTransformer
from ldm.models.layers import ResnetBlock
from ldm.training import checkpoint as ckpt
from ldm.training.distributed import (
    check_units, gather_optimizer_state, gather_tensors, load_optimizer_state, load_parameters, materialize, meta_skeleton,
    trainable_parameters,
)
from ldm.training.ema import EMA

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
output = Path(sys.argv[1])
torch.manual_seed(123)
latents, context = torch.randn(4, 4, 4, 4), torch.randn(4, 6, 64)
noise, timesteps = torch.randn(4, 4, 4, 4), torch.randint(0, 1000, (4,))

def build(seed, shard):
    unet = micro_models(seed).unet.train()
    skeleton = meta_skeleton(unet)
    if shard:  # the units fsdp_transformer_layer_cls_to_wrap=ResnetBlock,SpatialTransformer gives, then the root
        for module in list(unet.modules()):
            if isinstance(module, (ResnetBlock, SpatialTransformer)):
                fully_shard(module)
        fully_shard(unet)
        check_units(unet)
    # eps 1e-4, not 1e-8: a conv bias right before a GroupNorm has a gradient of exactly zero in exact
    # arithmetic, i.e. float noise that differs with the summation order, and Adam with a tiny eps
    # turns that noise into full steps of random sign in both runs.
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2, weight_decay=1e-2, eps=1e-4)
    parameters = trainable_parameters({{"unet": unet}})
    return unet, skeleton, optimizer, parameters, {{p: n for n, p in parameters.items()}}, EMA(unet, 0.9)

def step(unet, optimizer, ema, rows):
    # Local mean over this rank's rows; FSDP2 averages gradients over ranks = the mean over all rows.
    prediction = unet(latents[rows] + noise[rows], timesteps[rows], context[rows])
    torch.nn.functional.mse_loss(prediction, noise[rows]).backward()
    torch.nn.utils.clip_grad_norm_(list(unet.parameters()), 0.05)  # the norm of the whole, sharded gradient
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(unet)

mine = slice(2 * rank, 2 * rank + 2)
unet, skeleton, optimizer, parameters, names, ema = build(0, shard=True)
reference, _, ref_optimizer, ref_parameters, ref_names, ref_ema = build(0, shard=False)
local = sum(p.to_local().numel() for p in unet.parameters())
for _ in range(3):
    step(unet, optimizer, ema, mine)
    step(reference, ref_optimizer, ref_ema, slice(0, 4))

def difference(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:3]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

def optimizer_difference(a, b):
    return max(difference(a["state"][n], b["state"][n]) for n in b["state"])

start = gather_tensors(trainable_parameters({{"unet": micro_models(0).unet}}))
result = {{
    "sharded": all(isinstance(p, DTensor) for p in unet.parameters()),
    "local_fraction": local / sum(p.numel() for p in reference.parameters()),
    "moved": difference(gather_tensors(ref_parameters), start),
    "weights": difference(gather_tensors(parameters), gather_tensors(ref_parameters)),
    "ema": difference(ema.state_dict(), ref_ema.state_dict()),
    "optimizer": optimizer_difference(gather_optimizer_state(optimizer, names), gather_optimizer_state(ref_optimizer, ref_names)),
}}

# A checkpoint from the sharded run, read back into freshly built (other seed) sharded modules.
state = ckpt.TrainingState(
    step=3, epoch=0, batch=3, settings={{}}, world_size=world, trainable=gather_tensors(parameters, keep=rank == 0),
    ema=ema.state_dict(), optimizer=gather_optimizer_state(optimizer, names), lr_scheduler={{}}, rng=[],
)
if rank == 0:
    ckpt.save_checkpoint(output, state)
dist.barrier()
saved = ckpt.load_checkpoint(ckpt.resolve_resume(output, "latest"))
unet, skeleton, optimizer, parameters, names, ema = build(5, shard=True)
load_parameters(parameters, saved.trainable)
load_optimizer_state(optimizer, saved.optimizer, names)
ema.load_state_dict(saved.ema)
for _ in range(2):
    step(unet, optimizer, ema, mine)
    step(reference, ref_optimizer, ref_ema, slice(0, 4))
result["resumed_weights"] = difference(gather_tensors(parameters), gather_tensors(ref_parameters))
result["resumed_ema"] = difference(ema.state_dict(), ref_ema.state_dict())

# The result the loop returns: a plain copy with the whole (here: EMA) weights, on the main process.
ema.copy_to(unet)
ref_ema.copy_to(reference)
whole = gather_tensors(unet.state_dict(), keep=rank == 0)
if rank == 0:
    plain = materialize(skeleton, whole).eval()
    with torch.no_grad():
        out, expected = plain(latents, timesteps, context), reference.eval()(latents, timesteps, context)
    result["plain_state"] = difference(plain.state_dict(), reference.state_dict())
    result["plain_output"] = float((out - expected).abs().max())
    result["plain_is_plain"] = not any(isinstance(p, DTensor) for p in plain.parameters())

# A down block as a unit would lose the skip connections it pushes: refused before any step.
unet = micro_models(0).unet
fully_shard(unet.down_blocks[0])
fully_shard(unet)
try:
    check_units(unet)
    result["refused_down_block"] = ""
except ConfigError as error:
    result["refused_down_block"] = str(error)
(output / f"rank{{rank}}.json").write_text(json.dumps(result))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fully_sharded_state_gathers_resumes_and_matches_one_process(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT.format())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(script), str(tmp_path)]
    done = subprocess.run(command, env=CHILD_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["sharded"] and result["local_fraction"] < 0.6  # each rank holds about half
        assert result["moved"] > 1e-3  # training changed the weights, so agreeing is not trivial
        # Sharded 2 x 2 rows against one process on 4 rows: equal up to float summation order.
        for key in ("weights", "ema", "optimizer", "resumed_weights", "resumed_ema"):
            assert result[key] < 1e-5, (key, result[key])
    assert ranks[0]["refused_down_block"].startswith("FSDP cannot shard down_blocks.0 as a unit (DownBlock passes")
    assert ranks[0]["plain_is_plain"] and ranks[0]["plain_state"] < 1e-5 and ranks[0]["plain_output"] < 1e-4


@pytest.mark.slow
def test_fsdp_launch_on_cpu_is_refused_with_one_line(tmp_path):
    """accelerate would silently run this as DDP; ldm finetune says so instead of pretending to shard."""
    model = save_micro_model(tmp_path / "model")
    data = colour_folder(tmp_path / "data", {"red": (230, 20, 20)}, per_caption=2)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "ldm", "finetune", "--model", str(model),
               "--data", str(data), "--output", str(tmp_path / "out"), "--resolution", "32", "--max-steps", "1",
               "--no-progress"]
    done = subprocess.run(command, env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "FSDP was requested but accelerate runs this launch as MULTI_CPU (it shards on GPUs only); drop --use_fsdp" in done.stderr
    assert not (tmp_path / "out" / "model").exists()
