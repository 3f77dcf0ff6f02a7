"""The fast network build of loading: networks built on the meta device without running their
initialisers must be the same networks, and every tensor must end up loaded from the file."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import save_diffusers_folder
from torch import nn
from transformers import CLIPTextModel

from ldm.loading import load_components, save_single_file
from ldm.errors import CheckpointError
from ldm.loading.components import _NoValueWritesOnMeta, assign_state, build_networks, convert_copy, shapes_of
from ldm.loading.single_file import single_file_state
from ldm.models import AutoencoderKL, UNet, UNetConfig, VAEConfig
from ldm.models.text_encoder import clip_config

FAMILIES = ("sd1", "sd2")
FULL_SIZE = {"sd1": UNetConfig.sd1(), "sd2": UNetConfig.sd2()}


def _layout(model: nn.Module) -> dict:
    """Everything about a network except its values."""
    state = model.state_dict(keep_vars=True)
    return {key: (type(t), t.shape, t.dtype, t.device, t.requires_grad) for key, t in state.items()}


def _unloaded(model: nn.Module) -> list[str]:
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


@pytest.mark.parametrize("family", FAMILIES)
def test_build_without_initialisers_gives_the_same_networks(family):
    """Full-size SD networks (on meta, so no memory) match a plain meta-device build exactly."""
    unet_config, vae_config, text_config = FULL_SIZE[family], VAEConfig.sd(), clip_config(family)
    with torch.device("meta"):
        plain = (UNet(unet_config), AutoencoderKL(vae_config), CLIPTextModel(text_config))
    fast = build_networks(unet_config, vae_config, text_config)
    for ours, reference in zip(fast, plain):
        assert type(ours) is type(reference)
        assert repr(ours) == repr(reference)
        assert _layout(ours) == _layout(reference)
        assert all(t.is_meta for t in ours.state_dict().values())


def test_initialisers_still_run_on_real_tensors_and_after_the_build():
    """Only writes into meta tensors are skipped: a CPU module built inside the mode, or any
    module built after it, is initialised exactly as usual."""

    def seeded_linear() -> nn.Linear:
        torch.manual_seed(0)
        return nn.Linear(16, 8, device="cpu")

    reference = seeded_linear()
    assert reference.weight.abs().sum() > 0
    with torch.device("meta"), _NoValueWritesOnMeta():
        inside = seeded_linear()
        norm = nn.GroupNorm(2, 8, device="cpu")
    assert torch.equal(inside.weight, reference.weight) and torch.equal(inside.bias, reference.bias)
    assert torch.equal(norm.weight, torch.ones(8)) and torch.equal(norm.bias, torch.zeros(8))
    build_networks(UNetConfig.tiny(), VAEConfig.tiny(), clip_config("sd1"))
    after = seeded_linear()
    assert torch.equal(after.weight, reference.weight) and torch.equal(after.bias, reference.bias)


@pytest.fixture(scope="module")
def single_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("meta-build")
    files = {}
    for family in FAMILIES:
        folder = save_diffusers_folder(root / family, family)
        files[family] = (folder, save_single_file(load_components(folder), root / f"{family}.safetensors"))
    return files


@pytest.mark.parametrize("family", FAMILIES)
def test_every_loaded_tensor_is_the_files(family, single_files):
    folder, path = single_files[family]
    loaded = load_components(path)
    for model in (loaded.unet, loaded.vae, loaded.text_encoder):
        assert _unloaded(model) == []
    with safe_open(str(path), "pt") as f:
        in_file = {key: f.get_tensor(key) for key in f.keys()}
    state = single_file_state(loaded)
    assert state.keys() == in_file.keys()
    for key, value in in_file.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key
    # The diffusers folder the file came from: same tensors, key for key.
    from_folder = load_components(folder)
    pairs = zip((loaded.unet, loaded.vae, loaded.text_encoder), (from_folder.unet, from_folder.vae, from_folder.text_encoder))
    for ours, theirs in pairs:
        assert _unloaded(theirs) == []
        expected = theirs.state_dict()
        assert all(torch.equal(value, expected[key]) for key, value in ours.state_dict().items())


@pytest.mark.parametrize(("source", "target"), [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_conversion_between_16_bit_types_is_torchs_bit_for_bit(source, target):
    """The chunked conversion through fp32 (a buffer shorter than the tensor, and not dividing it) gives what
    ``Tensor.to`` gives: one rounding to nearest even, overflow to infinity, signed zeros, subnormals; a NaN
    stays a NaN (its payload may differ)."""
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 6e-8, -6e-8, 1e-40, 65504.0, 7e4, 3e38])
    values = torch.cat([torch.randn(5000) * 300, special]).to(source)
    expected = values.to(target)
    got = convert_copy(torch.empty_like(values, dtype=target), values, torch.empty(777))
    assert torch.equal(got.isnan(), expected.isnan())
    numbers = ~expected.isnan()
    assert torch.equal(got[numbers].view(torch.int16), expected[numbers].view(torch.int16))


def test_a_file_loaded_in_another_16_bit_type_holds_its_values_converted(single_files):
    """An fp16 file loaded in bf16 (the released SDXL file on a CPU with bf16) goes through ``converted``: every
    tensor equals torch's own conversion of the file's."""
    _, path = single_files["sd1"]
    fp16 = path.parent / "fp16.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    save_file({key: t.half() if t.is_floating_point() else t for key, t in tensors.items()}, fp16)
    loaded = load_components(fp16, dtype=torch.bfloat16)
    state = single_file_state(loaded)
    with safe_open(str(fp16), "pt") as f:
        for key in f.keys():
            value = f.get_tensor(key)
            if value.is_floating_point():
                assert torch.equal(state[key].view(torch.int16), value.bfloat16().view(torch.int16)), key
            else:
                assert torch.equal(state[key], value), key


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table


def test_assigning_a_state_makes_its_tensors_the_network_s_own_and_checks_them_as_load_state_dict_does():
    """``assign_state`` stands in for ``load_state_dict(strict=True, assign=True)``: the tensors themselves become
    the parameters (a frozen one stays frozen) and buffers, and a missing, extra or misshapen tensor is refused."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 2), nn.GroupNorm(1, 2), _WithBuffer())
    model[0].bias.requires_grad_(False)
    shapes = shapes_of(model)
    state = {key: torch.randn(shape) for key, shape in shapes.items()}
    for broken, message in [
        ({k: v for k, v in state.items() if k != "0.bias"}, "1 missing key(s) (0.bias)"),
        ({**state, "3.weight": torch.ones(1)}, "1 unexpected key(s) (3.weight)"),
        ({**state, "0.weight": torch.ones(2, 4)}, "shape mismatch for 0.weight in the test: [2, 4], the model needs [2, 3]"),
    ]:
        with pytest.raises(CheckpointError, match=re.escape(message)):
            assign_state(model, broken, shapes, "the test")
    assign_state(model, state, shapes, "the test")
    own = model.state_dict()
    assert all(own[key].data_ptr() == value.data_ptr() for key, value in state.items())
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.requires_grad
    assert isinstance(model[0].bias, nn.Parameter) and not model[0].bias.requires_grad
    assert not isinstance(model[2].table, nn.Parameter) and torch.equal(model[2].table, state["2.table"])
    assert model(torch.ones(4, 3)).shape == (4, 2)


def test_a_module_with_a_loading_of_its_own_is_loaded_by_torch():
    """A load hook, or a module's own ``_load_from_state_dict`` (BatchNorm's), is honoured: such a network goes
    through ``load_state_dict``, with the same checks first."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    seen = []
    model[0].register_load_state_dict_pre_hook(lambda module, state, prefix, *rest: seen.append(prefix))
    shapes = shapes_of(model)
    state = {key: torch.randn(shape) if shape else torch.tensor(4) for key, shape in shapes.items()}
    with pytest.raises(CheckpointError, match="1 missing key"):
        assign_state(model, {k: v for k, v in state.items() if k != "1.running_var"}, shapes, "the test")
    assign_state(model, state, shapes, "the test")
    assert seen == ["0."] and model[1].num_batches_tracked.item() == 4
    assert model[0].weight.data_ptr() == state["0.weight"].data_ptr()
