"""The metrics log across a resume: every step appears once, in CSV and in TensorBoard."""

from __future__ import annotations

import csv

import pytest
from test_training_support import colour_folder, micro_models, one_torch_thread  # noqa: F401 - autouse fixture

from ldm.training import DataConfig, ImageCaptionDataset, TrainConfig, scan_folder, train

COLOURS = {"zqx": (230, 20, 20), "a photo of a dog": (20, 20, 230), "grass": (20, 200, 20)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    config = DataConfig(resolution=32, random_flip=True, caption_dropout=0.2)
    return ImageCaptionDataset(scan_folder(colour_folder(tmp_path_factory.mktemp("data"), COLOURS), config), config, seed=3)


def run(dataset, output, steps, log_format, resume=None):
    config = TrainConfig(max_steps=steps, batch_size=2, learning_rate=1e-3, seed=3, checkpointing_steps=2, log_format=log_format)
    train(micro_models(), dataset, config, output, resume=resume, show_progress=False)


def csv_losses(output) -> list[tuple[int, float]]:
    with open(output / "log.csv", newline="") as f:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f)]


def test_csv_rows_after_the_resumed_checkpoint_are_replaced_not_repeated(tmp_path, dataset):
    run(dataset, tmp_path / "whole", 5, "csv")
    run(dataset, tmp_path / "cut", 3, "csv")  # as if killed after step 3, resumed from the checkpoint at step 2
    assert [s for s, _ in csv_losses(tmp_path / "cut")] == [1, 2, 3]
    run(dataset, tmp_path / "cut", 5, "csv", resume=str(tmp_path / "cut" / "checkpoints" / "checkpoint-000002"))
    assert csv_losses(tmp_path / "cut") == csv_losses(tmp_path / "whole")


def test_tensorboard_purges_the_steps_a_resumed_run_logs_again(tmp_path, dataset):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(dataset, tmp_path / "whole", 5, "csv")
    run(dataset, tmp_path / "cut", 3, "tensorboard")
    run(dataset, tmp_path / "cut", 5, "tensorboard", resume=str(tmp_path / "cut" / "checkpoints" / "checkpoint-000002"))
    events = EventAccumulator(str(tmp_path / "cut" / "tensorboard"))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5]
    expected = csv_losses(tmp_path / "whole")
    assert all(abs(value - loss) < 1e-6 for (_, value), (_, loss) in zip(logged, expected))
