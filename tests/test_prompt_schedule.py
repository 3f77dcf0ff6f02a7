"""A1111's prompt editing, alternation and AND (ldm/prompt_schedule.py): the schedules its parser gives.

The cases of A1111's own docstring (``get_learned_conditioning_prompt_schedules`` in
``modules/prompt_parser.py``), then cases checked against A1111's grammar run with lark.
"""

from __future__ import annotations

import pytest

from ldm.errors import InputError, SettingError
from ldm.prompt_schedule import plan_prompts, prompt_schedule, split_subprompts, text_index
from ldm.settings import GenerationSettings

ALTERNATING = [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]

# A1111's docstring, g = lambda p: get_learned_conditioning_prompt_schedules([p], 10)[0]
DOCSTRING = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", ALTERNATING),
    ("[fe|]male", [[i, "female" if i % 2 else "male"] for i in range(1, 11)]),
    ("[fe|||]male", [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]),
    # The docstring still says [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"), written
    # before "|" left ``plain``; A1111's grammar of today fails on the "|" and keeps the prompt as text.
    ("a [{b|d{:.5] c", [[10, "a [{b|d{:.5] c"]]),
]


@pytest.mark.parametrize("text, expected", DOCSTRING)
def test_a1111_docstring_cases(text, expected):
    assert prompt_schedule(text, 10) == [tuple(entry) for entry in expected]


# Each checked against A1111's grammar (lark 1.1.2, the version A1111 pins) with 10 steps.
MORE = [
    ("a [b:1.5] c", [[10, "a  c"]]),  # a decimal point: a fraction, 15 steps, capped at 10
    ("[a:b:1e1]", [[10, "a"]]),  # no decimal point: a step number
    ("[a:b:0]", [[10, "b"]]),  # a step below 1 adds no boundary: "to" from the start
    ("[a:b:-2]", [[10, "b"]]),
    ("[a:b:+.5]", [[5, "a"], [10, "b"]]),
    ("[a:b:3 ]", [[3, "a"], [10, "b"]]),
    ("[a::3]", [[3, "a"], [10, ""]]),
    ("[:b:3]", [[3, ""], [10, "b"]]),
    ("[[a|b]:c:3]", [[1, "a"], [2, "b"], [3, "a"]] + [[i, "c"] for i in range(4, 11)]),
    ("a|b", [[10, "a|b"]]),  # "|" outside brackets: A1111's grammar fails, the prompt is text
    ("[a|b:3]", [[10, "[a|b:3]"]]),
    ("[a:b:3] x|y", [[10, "[a:b:3] x|y"]]),  # ... also its edits
    ("[a:b:3] \\", [[10, "[a:b:3] \\"]]),  # a backslash ending the prompt
    ("\\[a:b:3\\]", [[10, "\\[a:b:3\\]"]]),  # escaped brackets stay literal
    ("[a\\|b]", [[10, "[a\\|b]"]]),
    ("[a:b:c:3]", [[10, "[a:b:c:3]"]]),
    ("[a:(b:c):3]", [[3, "a"], [10, "(b:c)"]]),
    ("([a:b:3]:1.2)", [[3, "(a:1.2)"], [10, "(b:1.2)"]]),  # weighting around an edit
    ("[a:b:3] AND c", [[3, "a AND c"], [10, "b AND c"]]),  # AND is split before, by split_subprompts
]


@pytest.mark.parametrize("text, expected", MORE)
def test_cases_checked_against_a1111s_grammar(text, expected):
    assert prompt_schedule(text, 10) == [tuple(entry) for entry in expected]


def test_a1111s_own_example_of_100_steps():
    text = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
        "[ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedule(text, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_step_i_counted_from_0_reads_the_first_entry_ending_at_or_after_it():
    # A1111's reconstruct_cond_batch with CFGDenoiser.step from 0: "until step 2" covers steps 0, 1 and 2.
    schedule = prompt_schedule("[a:b:0.5]", 4)
    assert schedule == [(2, "a"), (4, "b")]
    assert [schedule[text_index(schedule, i)][1] for i in range(4)] == ["a", "a", "a", "b"]
    alternating = prompt_schedule("[a|b]", 4)
    assert [alternating[text_index(alternating, i)][1] for i in range(4)] == ["a", "a", "b", "a"]


def test_deep_nesting_is_refused():
    with pytest.raises(InputError, match="nest more than"):
        prompt_schedule("[" * 40 + "a:3" + "]" * 40, 10)


# --- AND -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a cat", [("a cat", 1.0)]),
        ("a cat ", [("a cat ", 1.0)]),  # no AND, no weight: as written
        ("a AND b :1.2 AND c :0.5", [("a", 1.0), (" b", 1.2), (" c", 0.5)]),
        ("a cat :1.2", [("a cat", 1.2)]),  # a weight without AND, as A1111 reads it
        ("ratio 16:9", [("ratio 16", 9.0)]),  # ... also where it was not meant as one
        ("a : -0.5 AND b:.5", [("a", -0.5), (" b", 0.5)]),
        ("ANDROID AND b", [("ANDROID", 1.0), (" b", 1.0)]),  # AND as a word of its own, upper case
        ("a and b", [("a and b", 1.0)]),
        ("[a AND b:c:3]", [("[a", 1.0), (" b:c:3]", 1.0)]),  # split first, before any bracket is read
    ],
)
def test_and_splits_into_weighted_subprompts_as_a1111(text, expected):
    assert split_subprompts(text) == expected


def test_a_subprompt_weight_beyond_the_limit_is_refused():
    with pytest.raises(InputError, match="keep weights within"):
        split_subprompts("a AND b :1000")
    with pytest.raises(SettingError, match="prompt"):
        GenerationSettings(prompt="a AND b :" + "9" * 400)


# --- what a call encodes ---------------------------------------------------------------------------


def test_a_call_without_the_syntax_encodes_its_prompts_and_negatives_as_before():
    plan = plan_prompts(["a cat", "a dog"], ["", "blurry"], 5)
    assert plan.texts == ("a cat", "a dog", "", "blurry") and plan.weights is None
    assert plan.cond == (((0,) * 5, (1,) * 5),) and plan.uncond == ((2,) * 5, (3,) * 5)


def test_each_distinct_text_of_a_schedule_is_encoded_once():
    plan = plan_prompts(["[a|b] cat"], ["[x:y:2]"], 6)
    assert plan.texts == ("a cat", "b cat", "x", "y")
    assert plan.cond == (((0, 0, 1, 0, 1, 0),),)
    assert plan.uncond == ((2, 2, 2, 3, 3, 3),)


def test_subprompts_get_their_own_schedules_and_fewer_are_padded_with_weight_0():
    plan = plan_prompts(["a AND [b:c:1] :2", "d"], None, 3)
    assert plan.texts == ("a", " b", " c", "d")
    assert plan.cond == (((0, 0, 0), (3, 3, 3)), ((1, 1, 2), (3, 3, 3)))
    assert plan.weights == ((1.0, 1.0), (2.0, 0.0))


def test_negative_prompts_take_no_and():
    plan = plan_prompts(["a"], ["b AND c"], 2)
    assert plan.texts == ("a", "b AND c")  # encoded as words, as A1111 encodes a negative's AND
