"""A run's result: kept in its last checkpoint, published beside it as hard links, replaced only by a continuation."""

from __future__ import annotations

import pytest

from ldm.training.results import publish, same_files, save_result


def test_publish_links_a_file_and_replaces_the_superseded_one(tmp_path):
    source, target = tmp_path / "kept.bin", tmp_path / "lora.safetensors"
    source.write_bytes(b"new")
    target.write_bytes(b"old")
    assert publish(source, target) == target
    assert target.samefile(source) and target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.bin", "lora.safetensors"]  # no staging left


def test_publish_replaces_a_folder_with_a_linked_copy(tmp_path):
    source, target = tmp_path / "checkpoint" / "model", tmp_path / "model"
    (source / "unet").mkdir(parents=True)
    (source / "unet" / "weights").write_bytes(b"new")
    (source / "index.json").write_text("{}")
    (target / "unet").mkdir(parents=True)
    (target / "unet" / "weights").write_bytes(b"old")
    (target / "stale.json").write_text("{}")
    publish(source, target)
    assert same_files(source, target) and not (target / "stale.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "model"]


def test_save_result_keeps_it_in_the_runs_checkpoint_once(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "checkpoint-000004"
    checkpoint.mkdir(parents=True)
    calls = []

    def save(path):
        calls.append(path)
        path.write_bytes(b"result")
        return path

    target = tmp_path / "lora.safetensors"
    save_result(target, checkpoint, save)
    assert calls == [checkpoint / "lora.safetensors"] and target.samefile(checkpoint / "lora.safetensors")
    target.unlink()  # as if killed between keeping and publishing: the kept copy is reused, not rewritten
    save_result(target, checkpoint, save)
    assert len(calls) == 1 and target.samefile(checkpoint / "lora.safetensors")


@pytest.mark.parametrize("checkpoint", [None, "elsewhere"])
def test_without_a_checkpoint_of_its_own_the_result_is_written_in_place_never_over_one(tmp_path, checkpoint):
    from ldm.io import atomic_write

    if checkpoint is not None:
        checkpoint = tmp_path / "other-run" / "checkpoints" / "checkpoint-000001"
        checkpoint.mkdir(parents=True)
    target = tmp_path / "run" / "lora.safetensors"
    save = lambda path: atomic_write(path, lambda tmp: tmp.write_bytes(b"result"))  # noqa: E731
    save_result(target, checkpoint, save)
    assert target.read_bytes() == b"result"
    if checkpoint is not None:
        assert list(checkpoint.iterdir()) == []  # another run's checkpoint is not written to
    with pytest.raises(FileExistsError):
        save_result(target, checkpoint, save)
