"""Idle networks' memory-mapped weights go back to the page cache, and nothing the process wrote is lost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import save_diffusers_folder
from torch import nn

from ldm.loading.sources import TensorFile
from ldm.paging import PAGE, convert, release_to_page_cache, resident_bytes
from ldm.pipeline import Pipeline

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/pagemap is Linux's")


def mapped_layers(tmp_path: Path) -> nn.Sequential:
    """Three 64 KiB-weight linear layers whose weights are views of a safetensors file's mapping."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(128, 128) for _ in range(3)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "layers.safetensors"))
    source = TensorFile(tmp_path / "layers.safetensors")  # as the loaders read every checkpoint
    model.load_state_dict({key: source.read(key) for key in source.shapes}, assign=True)
    return model


def mapped_convs(folder: Path) -> nn.Sequential:
    """Two 144 KiB-weight 3x3 convolutions whose weights are views of a safetensors file's mapping, every page mapped
    by a forward pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "convs.safetensors"))
    source = TensorFile(folder / "convs.safetensors")
    model.load_state_dict({key: source.read(key) for key in source.shapes}, assign=True)
    with torch.no_grad():
        model(torch.zeros(1, 64, 4, 4))
    return model


def test_a_conversion_hands_back_the_file_pages_of_the_weights_it_replaced(tmp_path):
    """Turning file-mapped conv weights channels-last (as a bf16 pipeline does) reads the originals; ``convert``
    unmaps them afterwards, where a plain ``.to`` leaves them resident beside their copies."""
    plain, converted = mapped_convs(tmp_path / "plain"), mapped_convs(tmp_path / "converted")
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        expected = converted(x)
    originals = {name: [layer.weight.detach() for layer in model] for name, model in (("plain", plain), ("converted", converted))}
    assert all(resident_bytes(w) >= w.numel() * 4 for ws in originals.values() for w in ws)
    plain.to(memory_format=torch.channels_last)
    convert(converted, memory_format=torch.channels_last)
    for model in (plain, converted):
        assert all(layer.weight.is_contiguous(memory_format=torch.channels_last) for layer in model)
    assert all(resident_bytes(w) >= w.numel() * 4 - PAGE for w in originals["plain"])  # still resident: a second copy
    assert all(resident_bytes(w) == 0 for w in originals["converted"])
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-6)


def test_unmodified_file_mapped_weights_leave_memory_and_read_back_the_same(tmp_path):
    model = mapped_layers(tmp_path)
    x = torch.randn(4, 128)
    with torch.no_grad():
        expected = model(x).clone()  # every weight page is now mapped
    weights = [layer.weight for layer in model]
    assert all(resident_bytes(w) >= w.numel() * 4 for w in weights)
    released = release_to_page_cache(model)
    assert released >= 3 * 128 * 128 * 4
    assert all(resident_bytes(w) == 0 for w in weights)
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # the pages map again from the file


def test_weights_the_process_wrote_or_owns_are_never_unmapped(tmp_path):
    model = mapped_layers(tmp_path)
    with torch.no_grad():
        model(torch.randn(4, 128))  # every weight page mapped
        model[1].weight.add_(1.0)  # copy-on-write: these pages are the process's own now (a fused LoRA does this)
    edited = model[1].weight.clone()
    owned = nn.Linear(128, 128)  # ordinary process memory, not a file
    owned_weight = owned.weight.detach().clone()
    release_to_page_cache(model)
    release_to_page_cache(owned)
    assert torch.equal(model[1].weight, edited) and torch.equal(owned.weight, owned_weight)
    assert resident_bytes(model[1].weight) >= 128 * 128 * 4 - 2 * PAGE
    # Its untouched neighbours in the same file still go, but for a page one may share with the edited weight.
    assert resident_bytes(model[0].weight) <= PAGE and resident_bytes(model[2].weight) <= PAGE


def test_pipeline_pages_each_network_out_after_its_stage_and_keeps_the_image(tmp_path):
    folder = save_diffusers_folder(tmp_path / "model")
    kept = Pipeline.from_pretrained(folder)
    kept.configure(weights_after_use="keep")
    expected = kept("a cat", seed=1, output_type="pt", height=64, width=64, num_inference_steps=2).images

    pipe = Pipeline.from_pretrained(folder)
    assert pipe.setup.weights_after_use == "page-out"  # the default
    text_weight = pipe.text_encoder.get_input_embeddings().weight
    seen: list[int] = []  # the text encoder's resident embedding bytes at each U-Net call
    pipe.unet.register_forward_pre_hook(lambda *_: seen.append(resident_bytes(text_weight)))
    for _ in range(2):  # a second call maps everything again
        got = pipe("a cat", seed=1, output_type="pt", height=64, width=64, num_inference_steps=2).images
        assert torch.equal(got, expected)
    assert seen and set(seen) == {0}
    assert resident_bytes(pipe.unet.conv_in.weight) == 0 and resident_bytes(pipe.vae.decoder.conv_out.weight) == 0
    assert resident_bytes(kept.unet.conv_in.weight) > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file mappings are read from /proc (Linux)")
def test_only_file_backed_weights_are_held_through_a_conversion(tmp_path):
    """``convert`` holds the old weights it will unmap; one in the process's own memory must not be held (each old
    copy could then only be freed after the last new one is made), one in a file mapping costs nothing to hold."""
    from ldm.paging import file_backed

    mapped = mapped_convs(tmp_path)[0].weight.detach()
    own = torch.randn(64, 64, 3, 3)
    assert [t.data_ptr() for t in file_backed([own, mapped])] == [mapped.data_ptr()]


def test_a_model_converted_while_loading_hands_the_file_pages_it_read_back(monkeypatch, tmp_path):
    """An fp16 file loaded in fp32: every weight is a converted copy, and the file pages its source read go back to the
    page cache while loading (in batches), instead of staying resident beside the copies."""
    from ldm import paging
    from ldm.loading import components, load_components, save_single_file
    from ldm.loading.sources import TensorFile

    path = save_single_file(load_components(save_diffusers_folder(tmp_path / "folder")), tmp_path / "model.safetensors", dtype=torch.float16)
    file = TensorFile(path)
    fp16_bytes = sum(file.read(key).nbytes for key in file.shapes if file.read(key).dtype == torch.float16)
    released, sources = [], []
    real = paging.release_tensors

    def spy(tensors):
        tensors = list(tensors)
        sources.extend(tensors)
        released.append(real(tensors))
        return released[-1]

    monkeypatch.setattr(paging, "release_tensors", spy)
    monkeypatch.setattr(components, "RELEASE_BYTES", 64 * 1024)  # several batches on the tiny model
    model = load_components(path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())
    assert sum(t.nbytes for t in sources) == fp16_bytes and all(t.dtype == torch.float16 for t in sources)
    # Resident after the reads, released by the batches. (Reading a later tensor maps its neighbours' pages again,
    # the kernel's fault-around, which on this model of tiny tensors is much of the file, so what stays resident
    # at the end is not asserted; with SDXL's tensors it is a few pages each: docs/performance.md.)
    assert len(released) > 2 and sum(released) > fp16_bytes // 2
