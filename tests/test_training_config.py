"""Training settings: every float is finite and in range; errors name the field (the CLI names the flag)."""

from __future__ import annotations

import pytest

from ldm.errors import InputError, SettingError
from ldm.training.config import DataConfig, TrainConfig

# (field, a finite value out of its range, what else the field needs to be accepted at all)
FLOAT_SETTINGS = [
    ("caption_dropout", 1.5, {}),
    ("learning_rate", 0.0, {}),
    ("text_encoder_learning_rate", -1e-5, {}),
    ("adam_beta1", 1.0, {}),
    ("adam_beta2", -0.1, {}),
    ("weight_decay", -0.01, {}),
    ("adam_epsilon", 0.0, {}),
    ("max_grad_norm", -1.0, {}),
    ("min_snr_gamma", 0.0, {}),
    ("noise_offset", -0.05, {}),
    ("ema_decay", 1.0, {}),
    ("lora_alpha", 0.0, {"lora_rank": 2}),
]
BAD_FLOATS = [float("nan"), float("inf"), float("-inf")]


def build(field, value, extra):
    config = DataConfig if field in {f.name for f in DataConfig.__dataclass_fields__.values()} else TrainConfig
    return config(**{field: value, **extra})


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "out of range"])
@pytest.mark.parametrize(("field", "out_of_range", "extra"), FLOAT_SETTINGS)
def test_every_float_setting_is_finite_and_in_range(field, out_of_range, extra, bad):
    value = out_of_range if bad == "out of range" else float(bad)
    with pytest.raises(SettingError, match=rf"^{field} must be a finite number .*, got {value}$") as caught:
        build(field, value, extra)
    assert isinstance(caught.value, InputError)  # a one-line user error: exit code 2
    assert caught.value.fields == [field]


def test_the_defaults_and_the_range_ends_are_accepted():
    TrainConfig()
    DataConfig()
    TrainConfig(adam_beta1=0.0, weight_decay=0.0, noise_offset=0.0, sample_guidance_scale=0.0, ema_decay=0.9999)
    DataConfig(caption_dropout=1.0)


def test_a_setting_error_can_be_worded_with_other_labels():
    with pytest.raises(SettingError) as caught:
        TrainConfig(lora_alpha=4.0)
    assert str(caught.value) == "lora_alpha needs lora_rank"
    assert caught.value.worded(lambda field: f"<{field}>") == "<lora_alpha> needs <lora_rank>"
