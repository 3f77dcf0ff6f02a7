"""Prompt weighting syntax, 75-token chunking and weighted encoding."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import clip_text_model, clip_tokenizer

from ldm.errors import InputError
from ldm.prompts import BREAK, MAX_NESTING, check_prompt, encode_prompts, parse_prompt, tokenize_prompt

R = 1.1
S = 1 / 1.1

PARSE_CASES = [
    ("a cat", [("a cat", 1.0)]),
    ("", [("", 1.0)]),
    ("(cat)", [("cat", R)]),
    ("[cat]", [("cat", S)]),
    ("((cat))", [("cat", R * R)]),
    ("[[cat]]", [("cat", S * S)]),
    ("(cat:1.3)", [("cat", 1.3)]),
    ("(cat: 1.5 )", [("cat", 1.5)]),
    ("(cat:.5)", [("cat", 0.5)]),
    ("(cat:-1)", [("cat", -1.0)]),
    ("a (cat:1.3) on a mat", [("a ", 1.0), ("cat", 1.3), (" on a mat", 1.0)]),
    ("(a (cat:2))", [("a ", R), ("cat", 2 * R)]),
    ("[(cat:1.5)]", [("cat", 1.5 * S)]),
    ("(cat:0.5) (dog:0.5)", [("cat", 0.5), (" ", 1.0), ("dog", 0.5)]),
    (r"\(cat\)", [("(cat)", 1.0)]),
    (r"\[cat\]", [("[cat]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"(\(cat\))", [("(cat)", R)]),
    ("(cat", [("cat", R)]),
    ("a [cat", [("a ", 1.0), ("cat", S)]),
    ("cat)", [("cat)", 1.0)]),
    ("cat]", [("cat]", 1.0)]),
    ("time: 12:30", [("time: 12:30", 1.0)]),
    ("(cat:abc)", [("cat:abc", R)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("(a BREAK b)", [("a", R), BREAK, ("b", R)]),
    ("breakfast BREAKfast", [("breakfast BREAKfast", 1.0)]),
]


@pytest.mark.parametrize("text, expected", PARSE_CASES)
def test_parse_prompt_table(text, expected):
    parsed = parse_prompt(text)
    assert [fragment for fragment, _ in parsed] == [fragment for fragment, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


@pytest.mark.parametrize(
    "text, message",
    [
        ("a (cat:1" + "0" * 400 + ")", "the weight of 'cat' comes to inf"),  # 1e400 overflows to inf
        ("a (cat:-1" + "0" * 400 + ")", "the weight of 'cat' comes to -inf"),
        ("(((cat:90)))", "the weight of 'cat' comes to 108.9"),  # finite factors whose product is too big
        ("(" * 10_000 + "cat", f"nest more than {MAX_NESTING} deep at character {MAX_NESTING + 1}"),
        ("[" * 10_000 + "cat" + "]" * 10_000, f"nest more than {MAX_NESTING} deep"),
    ],
)
def test_weights_that_would_make_nan_images_are_refused_when_parsed(text, message):
    with pytest.raises(InputError, match=re.escape(message)):
        parse_prompt(text)


def test_the_deepest_allowed_nesting_and_weight_parse():
    assert parse_prompt("(" * MAX_NESTING + "cat")[0][1] == pytest.approx(R**MAX_NESTING)
    assert parse_prompt("(cat:100)") == [("cat", 100.0)]


def test_check_prompt_names_the_argument():
    with pytest.raises(InputError, match=r"^PROMPT is not valid UTF-8 text \(an undecodable byte at character 3\)"):
        check_prompt("a \udcff cat", "PROMPT")  # what sys.argv holds for the bytes b"a \xff cat"
    with pytest.raises(InputError, match=r"^negative_prompt: the weight of 'x' comes to inf"):
        check_prompt("(x:1" + "0" * 400 + ")", "negative_prompt")
    check_prompt("a (cat:1.3) BREAK [dog]", "PROMPT")


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer("sd2")


@pytest.fixture(scope="module")
def text_encoder():
    return clip_text_model("sd1")


def words(n: int) -> str:
    # "cat" is one CLIP token, so the prompt has exactly n tokens.
    return " ".join(["cat"] * n)


def test_short_prompt_matches_diffusers_tokenization(tokenizer):
    text = "a photo of an astronaut riding a horse on mars"
    chunks = tokenize_prompt(tokenizer, text)
    reference = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert chunks.ids == [reference]
    assert not chunks.is_weighted


def test_long_prompt_is_split_into_75_token_chunks(tokenizer):
    cat = tokenizer("cat", add_special_tokens=False).input_ids[0]
    chunks = tokenize_prompt(tokenizer, words(160))
    assert len(chunks.ids) == 3
    for ids in chunks.ids:
        assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
    body = [token for ids in chunks.ids for token in ids[1:] if token not in (tokenizer.eos_token_id, 0)]
    assert body == [cat] * 160
    assert chunks.ids[0][76] == tokenizer.eos_token_id
    assert chunks.ids[2][1 + 10] == tokenizer.eos_token_id


def test_exactly_75_tokens_fit_one_chunk(tokenizer):
    assert len(tokenize_prompt(tokenizer, words(75)).ids) == 1
    assert len(tokenize_prompt(tokenizer, words(76)).ids) == 2


def test_break_starts_a_new_chunk(tokenizer):
    chunks = tokenize_prompt(tokenizer, "red cat BREAK blue dog")
    assert len(chunks.ids) == 2
    assert chunks.ids[1][:4] == [tokenizer.bos_token_id, *tokenizer("blue dog", add_special_tokens=False).input_ids, tokenizer.eos_token_id]


def test_weights_follow_their_tokens(tokenizer):
    chunks = tokenize_prompt(tokenizer, "a (red cat:1.5) [dog]")
    assert chunks.is_weighted
    assert chunks.weights[0][:6] == pytest.approx([1.0, 1.0, 1.5, 1.5, S, 1.0])


def test_unweighted_encoding_equals_plain_clip(text_encoder, tokenizer):
    text = "a photo of a cat"
    ids = torch.tensor([tokenizer(text, padding="max_length", max_length=77).input_ids])
    with torch.no_grad():
        expected = text_encoder(ids).last_hidden_state
        got = encode_prompts(text_encoder, tokenizer, [text])
    assert torch.equal(got, expected)


def test_long_prompt_encodes_each_chunk_and_concatenates(text_encoder, tokenizer):
    with torch.no_grad():
        got = encode_prompts(text_encoder, tokenizer, [words(100)])
        first = encode_prompts(text_encoder, tokenizer, [words(75)])
        second = encode_prompts(text_encoder, tokenizer, [words(25)])
    assert got.shape == (1, 154, 64)
    torch.testing.assert_close(got, torch.cat([first, second], dim=1))


def test_batch_pads_short_prompts_with_empty_chunks(text_encoder, tokenizer):
    with torch.no_grad():
        batch = encode_prompts(text_encoder, tokenizer, [words(100), "a cat"])
        short = encode_prompts(text_encoder, tokenizer, ["a cat"])
        empty = encode_prompts(text_encoder, tokenizer, [""])
    assert batch.shape[1] == 154
    torch.testing.assert_close(batch[1:, :77], short, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[1:, 77:], empty, rtol=1e-5, atol=1e-5)


def test_weighting_scales_tokens_and_keeps_the_mean(tokenizer):
    text_encoder = clip_text_model("sd1")
    with torch.no_grad():  # released CLIP's final LayerNorm has a bias, so its embeddings have a mean clear of zero
        text_encoder.final_layer_norm.bias.normal_(0.2, 0.1, generator=torch.Generator().manual_seed(0))
        plain = encode_prompts(text_encoder, tokenizer, ["a red cat"])
        weighted = encode_prompts(text_encoder, tokenizer, ["a (red:1.5) cat"])
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5, abs=1e-6)
    ratio = weighted[0, :, 0] / plain[0, :, 0]
    keep = ratio[0].item()
    # Token 2 ("red") is 1.5x the rescale factor; every other position gets the factor alone.
    assert ratio[2].item() == pytest.approx(1.5 * keep, rel=1e-4)
    others = torch.cat([ratio[:2], ratio[3:]])
    torch.testing.assert_close(others, torch.full_like(others, keep), rtol=1e-4, atol=1e-6)
    assert keep != pytest.approx(1.0, abs=1e-6)


def test_weighting_an_embedding_of_mean_zero_only_scales_its_tokens():
    from ldm.prompts import apply_weights

    embedding = torch.randn(2, 77, 16)
    embedding[0] -= embedding[0].mean()  # as a final LayerNorm without bias gives: the mean is rounding noise
    weights = torch.ones(2, 77)
    weights[:, 3] = 1.2
    got = apply_weights(embedding, weights)
    assert got.isfinite().all()
    torch.testing.assert_close(got[0], embedding[0] * weights[0, :, None])  # no rescale by noise (or 0/0)
    assert got[1].mean().item() == pytest.approx(embedding[1].mean().item(), rel=1e-5)  # a clear mean is kept


def test_weighting_in_a_batch_does_not_touch_other_prompts(text_encoder, tokenizer):
    with torch.no_grad():
        alone = encode_prompts(text_encoder, tokenizer, ["a red cat"])
        batch = encode_prompts(text_encoder, tokenizer, ["a red cat", "a (red:1.5) cat"])
    torch.testing.assert_close(batch[:1], alone, rtol=1e-5, atol=1e-6)


def test_clip_skip_takes_an_earlier_layer(text_encoder, tokenizer):
    ids = torch.tensor([tokenizer("a cat", padding="max_length", max_length=77).input_ids])
    with torch.no_grad():
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = text_encoder.final_layer_norm(hidden)
        got = encode_prompts(text_encoder, tokenizer, ["a cat"], clip_skip=1)
    torch.testing.assert_close(got, expected)
