"""SD text encoder configurations, clip_skip and the shipped tokenizer."""

from __future__ import annotations

import pytest
import torch
from tiny_models import clip_text_model
from transformers import CLIPTextModel

from ldm.errors import ConfigError, InputError
from ldm.models.text_encoder import TOKENIZER_DIR, clip_config, encode_tokens, load_tokenizer


def test_sd1_config_is_the_openai_vit_l14_text_tower():
    c = clip_config("sd1")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (12, 768, 12, 3072)
    assert (c.hidden_act, c.projection_dim, c.max_position_embeddings, c.vocab_size) == ("quick_gelu", 768, 77, 49408)
    with torch.device("meta"):
        model = CLIPTextModel(c)
    assert sum(p.numel() for p in model.parameters()) == 123_060_480  # CLIP ViT-L/14 text encoder


def test_sd2_config_is_the_openclip_vit_h_text_tower_without_its_last_layer():
    c = clip_config("sd2")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (23, 1024, 16, 4096)
    assert (c.hidden_act, c.projection_dim, c.max_position_embeddings, c.vocab_size) == ("gelu", 512, 77, 49408)


def test_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError, match="sd1, sd2, sdxl, sdxl-refiner"):
        clip_config("sd3")
    with pytest.raises(ConfigError, match="sdxl-refiner family has no text_encoder"):
        clip_config("sdxl-refiner")


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_encode_tokens_without_skip_is_the_last_hidden_state(family):
    model = clip_text_model(family)
    ids = load_tokenizer(family)(["a red cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(encode_tokens(model, ids), model(ids).last_hidden_state)
        assert torch.equal(encode_tokens(model, ids, clip_skip=0), model(ids).last_hidden_state)


@pytest.mark.parametrize("skip", [1, 2])
def test_clip_skip_equals_a_truncated_encoder(skip):
    # Skipping k layers must give what a text encoder with only the first (layers - k) layers gives.
    model = clip_text_model("sd2")  # 3 layers
    config = model.config
    config_short = type(config)(**{**config.to_dict(), "num_hidden_layers": config.num_hidden_layers - skip})
    short = CLIPTextModel(config_short).eval()
    result = short.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and result.unexpected_keys  # exactly the dropped layers are left over
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(encode_tokens(model, ids, clip_skip=skip), short(ids).last_hidden_state)
        assert not torch.allclose(encode_tokens(model, ids, clip_skip=skip), encode_tokens(model, ids))


def test_clip_skip_out_of_range_is_an_input_error():
    model = clip_text_model("sd1")  # 2 layers
    with pytest.raises(InputError, match="clip_skip"):
        encode_tokens(model, torch.zeros(1, 77, dtype=torch.long), clip_skip=2)


def test_tokenizers_pad_as_the_released_models_do():
    sd1, sd2 = load_tokenizer("sd1"), load_tokenizer("sd2")
    assert len(sd1) == len(sd2) == 49408
    ids1 = sd1("a cat", padding="max_length", max_length=77).input_ids
    ids2 = sd2("a cat", padding="max_length", max_length=77).input_ids
    assert ids1[:4] == ids2[:4] == [49406, 320, 2368, 49407]
    assert ids1[4:] == [49407] * 73  # SD 1.x pads with <|endoftext|>
    assert ids2[4:] == [0] * 73  # SD 2.x pads with "!"


def test_tokenizer_from_a_folder(tmp_path):
    assert load_tokenizer(TOKENIZER_DIR)("a cat").input_ids == [49406, 320, 2368, 49407]
    with pytest.raises(ConfigError, match="not a CLIP tokenizer folder"):
        load_tokenizer(tmp_path)


def test_tokenizer_folder_saved_by_transformers_loads(tmp_path):
    """transformers 5 saves only tokenizer.json; such a folder (as diffusers writes it) must load."""
    load_tokenizer("sd2").save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "vocab.json").exists()
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.pad_token == "!"
