"""Prompts that change during the run: AUTOMATIC1111's prompt editing, alternation and ``AND``.

Read exactly as A1111's ``modules/prompt_parser.py`` reads them (its lark grammar, written here as a
small recursive-descent parser), for a run of ``steps`` steps:

- ``[from:to:when]`` reads ``from`` until step ``when``, then ``to``; ``[to:when]`` adds ``to`` after
  ``when``; ``[from::when]`` removes ``from`` after ``when``. A ``when`` written with a decimal point is
  a fraction of the steps (``0.25``, ``.5``, ``1.5``), one without is a step number (``10``); A1111's
  default "prompt editing timelines", not its legacy option that reads any ``when`` below 1 as a
  fraction. The step is ``min(steps, int(value))``.
- ``[a|b|c]`` reads ``a`` at step 1, ``b`` at step 2, ... cycling; an option may be empty (``[fe|]male``).
- they nest, and ``(word:1.2)`` / ``[word]`` weighting inside them is kept for ``ldm.prompts``.
- ``a AND b :1.2`` (composable diffusion, Liu et al. 2022) splits a prompt into sub-prompts, each with
  its own weight and schedule; ``ldm.guidance`` combines their predictions. Negative prompts take no
  ``AND`` (A1111 encodes theirs as words), but take editing and alternation.

A1111 reads a prompt its grammar cannot parse as plain text, without any editing or alternation: a
``|`` outside ``[...]`` (``a|b``), a backslash ending the prompt or a line, an unclosed ``[a:b:3``.
``prompt_schedule`` does the same, so the same prompt means the same image in both.

The schedule is A1111's: a list of ``(end_at_step, text)``. Denoising step i, counted from 0 as
A1111's ``CFGDenoiser`` counts its calls, reads the first entry with ``i <= end_at_step``; so
``[a:b:2]`` reads ``a`` at steps 0, 1 and 2 and ``b`` after.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ldm.errors import InputError
from ldm.prompts import MAX_NESTING, MAX_WEIGHT

# lark's SIGNED_NUMBER (ASCII digits, optional exponent), then optional whitespace and the closing bracket.
_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*\]")
# A1111's ``plain``: anything but brackets, ``:`` and ``|``, or a backslash and the next character
# (``.`` does not match a line break, as in lark).
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
# A1111's ``re_AND`` and ``re_weight``: sub-prompts, each with an optional trailing ``:weight``.
_AND = re.compile(r"\bAND\b")
_SUBPROMPT_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")

Schedule = list[tuple[int, str]]  # (end_at_step, text), A1111's prompt schedule


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``."""

    before: tuple | None
    after: tuple
    when: str  # the number as written: a decimal point makes it a fraction


@dataclass(frozen=True)
class _Alternate:
    """``[a|b|...]``: option (step - 1) % n at step ``step``."""

    options: tuple[tuple, ...]


Items = list  # of str, _Edit and _Alternate: a prompt as parsed


class _Parser:
    """A1111's grammar, where every bracket group that can be one is one (as lark resolves it).

    start:       (prompt | a literal "[", "]", "(", ")" or ":")*
    prompt:      (emphasized | scheduled | alternate | plain)*
    emphasized:  "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
    scheduled:   "[" [prompt ":"] prompt ":" NUMBER "]"     (whitespace around NUMBER)
    alternate:   "[" prompt ("|" [prompt])+ "]"

    Inside a group only groups and plain text may appear, so groups nest and never overlap; a
    bracket that opens no valid group is literal text at the top level and breaks the group around it.
    """

    def __init__(self, text: str):
        self.text = text
        self.groups: dict[int, tuple[Items, int] | None] = {}  # opening position -> (items, end)

    def parse(self) -> Items | None:
        """The prompt's items, or None where A1111's grammar fails (then the prompt is plain text)."""
        text, items, i = self.text, [], 0
        while i < len(text):
            if text[i] in "[(" and (group := self.group(i, 1)) is not None:
                items.extend(group[0])
                i = group[1]
            elif text[i] in "[]():":
                items.append(text[i])
                i += 1
            elif plain := _PLAIN.match(text, i):
                items.append(plain.group())
                i = plain.end()
            else:  # "|" outside brackets, or a backslash with nothing after it on its line
                return None
        return items

    def sequence(self, i: int, depth: int) -> tuple[Items, int]:
        """A ``prompt`` inside a group from ``i``: up to the first character it cannot take."""
        text, items = self.text, []
        while i < len(text):
            if text[i] in "[(":
                group = self.group(i, depth + 1)
                if group is None:
                    break
                items.extend(group[0])
                i = group[1]
            elif plain := _PLAIN.match(text, i):
                items.append(plain.group())
                i = plain.end()
            else:
                break
        return items, i

    def group(self, i: int, depth: int) -> tuple[Items, int] | None:
        """The group opening at ``i`` and where it ends, or None if none opens there."""
        if depth > MAX_NESTING:
            raise InputError(f"brackets nest more than {MAX_NESTING} deep at character {i + 1}")
        if i not in self.groups:
            self.groups[i] = self._square(i, depth) if self.text[i] == "[" else self._round(i, depth)
        return self.groups[i]

    def _at(self, i: int) -> str:
        return self.text[i] if i < len(self.text) else ""

    def _round(self, i: int, depth: int) -> tuple[Items, int] | None:
        first, j = self.sequence(i + 1, depth)
        if self._at(j) == ")":
            return ["(", *first, ")"], j + 1
        if self._at(j) == ":":
            second, k = self.sequence(j + 1, depth)
            if self._at(k) == ")":
                return ["(", *first, ":", *second, ")"], k + 1
        return None

    def _square(self, i: int, depth: int) -> tuple[Items, int] | None:
        first, j = self.sequence(i + 1, depth)
        if self._at(j) == "]":
            return ["[", *first, "]"], j + 1
        if self._at(j) == "|":
            options = [tuple(first)]
            while self._at(j) == "|":
                option, j = self.sequence(j + 1, depth)
                options.append(tuple(option))
            return ([_Alternate(tuple(options))], j + 1) if self._at(j) == "]" else None
        if self._at(j) != ":":
            return None
        if when := _WHEN.match(self.text, j + 1):  # [to:when]
            return [_Edit(None, tuple(first), when.group(1))], when.end()
        second, k = self.sequence(j + 1, depth)
        if self._at(k) == ":" and (when := _WHEN.match(self.text, k + 1)):  # [from:to:when]
            return [_Edit(tuple(first), tuple(second), when.group(1))], when.end()
        return None


def _when(number: str, steps: int) -> int:
    """A1111's step of a ``when``: a fraction of ``steps`` if written with a decimal point, capped at ``steps``."""
    value = float(number) * steps if "." in number else float(number)
    # min(steps, int(value)) as A1111 computes it, also for values int() cannot take (1e400).
    return steps if value >= steps else int(max(value, -1.0))


def _ends(items: Items, steps: int) -> set[int]:
    """The steps where some edit or alternation of ``items`` changes the text (A1111's ``collect_steps``)."""
    ends: set[int] = set()
    for item in items:
        if isinstance(item, _Edit):
            when = _when(item.when, steps)
            if when >= 1:
                ends.add(when)
            ends |= _ends(list(item.before or ()), steps) | _ends(list(item.after), steps)
        elif isinstance(item, _Alternate):
            ends.update(range(1, steps + 1))
            for option in item.options:
                ends |= _ends(list(option), steps)
    return ends


def _text_at(items: Items, step: int, steps: int) -> str:
    """The prompt's text at ``step`` (A1111's ``AtStep``)."""
    parts = []
    for item in items:
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, _Edit):
            chosen = (item.before or ()) if step <= _when(item.when, steps) else item.after
            parts.append(_text_at(list(chosen), step, steps))
        else:
            parts.append(_text_at(list(item.options[(step - 1) % len(item.options)]), step, steps))
    return "".join(parts)


def prompt_schedule(text: str, steps: int) -> Schedule:
    """A1111's schedule of one prompt over ``steps`` steps: ``(end_at_step, text)`` pairs, the last ending at ``steps``.

    A prompt without editing or alternation is ``[(steps, text)]``, its text unchanged.
    """
    items = _Parser(text).parse()
    if items is None:
        return [(steps, text)]
    return [(end, _text_at(items, end, steps)) for end in sorted(_ends(items, steps) | {steps})]


def text_index(schedule: Schedule, step: int) -> int:
    """The entry of ``schedule`` that denoising step ``step`` (from 0) reads: the first ending at or after it."""
    return next((k for k, (end, _) in enumerate(schedule) if step <= end), len(schedule) - 1)


def split_subprompts(text: str) -> list[tuple[str, float]]:
    """``a AND b :1.2`` as ``[("a", 1.0), (" b", 1.2)]``: A1111's sub-prompts and their weights.

    A1111 splits at every ``AND`` (upper case, a word of its own) and reads a trailing ``:number`` of
    each sub-prompt as its weight, also when there is no ``AND``: ``a cat :1.2`` is "a cat" guided
    1.2 times as strongly. A prompt with neither comes back whole, as written. A weight beyond
    ``MAX_WEIGHT`` (or not finite) raises ``InputError``.
    """
    parts = []
    for part in _AND.split(text):
        body, weight = _SUBPROMPT_WEIGHT.search(part).groups()
        parts.append((body, 1.0 if weight is None else float(weight), weight is not None))
    if len(parts) == 1 and not parts[0][2]:
        return [(text, 1.0)]
    for body, weight, _ in parts:
        if not abs(weight) <= MAX_WEIGHT:  # also infinite (a weight of 400 digits)
            raise InputError(f"the sub-prompt {body.strip()!r} has the weight {weight:g}; keep weights within +-{MAX_WEIGHT:g}")
    return [(body, weight) for body, weight, _ in parts]


@dataclass(frozen=True)
class PromptPlan:
    """What a call encodes, and which encoded text each sub-prompt and negative reads at each step.

    ``texts`` are each schedule's distinct texts, prompts first (sub-prompt by sub-prompt), then the
    negatives: a call without editing, alternation or ``AND`` encodes exactly its prompts and negatives.
    """

    texts: tuple[str, ...]
    cond: tuple[tuple[tuple[int, ...], ...], ...]  # cond[j][p][i]: the text of sub-prompt j of prompt p at step i
    weights: tuple[tuple[float, ...], ...] | None  # weights[j][p]; None: every prompt is one sub-prompt of weight 1
    uncond: tuple[tuple[int, ...], ...] | None  # uncond[p][i]: the text of negative p at step i; None: no negatives

    @property
    def scheduled(self) -> bool:
        """Whether a text changes between steps (prompt editing or alternation)."""
        rows = [row for part in self.cond for row in part] + list(self.uncond or ())
        return any(len(set(row)) > 1 for row in rows)

    @property
    def composed(self) -> bool:
        """Whether a prompt has sub-prompts or a weight (``AND``, ``:1.2``): guidance must combine them."""
        return self.weights is not None


def plan_prompts(prompts: list[str], negatives: list[str] | None, steps: int) -> PromptPlan:
    """The plan of a call of ``prompts`` (LoRA tags removed) and their ``negatives`` (None: unguided), for ``steps`` steps.

    Prompts with fewer sub-prompts than others get sub-prompts of weight 0 (their last repeated),
    which add nothing to the guided prediction, so a batch may mix them.
    """
    texts: list[str] = []

    def rows(text: str) -> tuple[int, ...]:
        schedule = prompt_schedule(text, steps)
        distinct = list(dict.fromkeys(entry for _, entry in schedule))
        first = len(texts)
        texts.extend(distinct)
        return tuple(first + distinct.index(schedule[text_index(schedule, i)][1]) for i in range(steps))

    split = [split_subprompts(prompt) for prompt in prompts]
    parts = max(len(subprompts) for subprompts in split)
    per_prompt = [[(rows(body), weight) for body, weight in subprompts] for subprompts in split]
    for subprompts in per_prompt:
        subprompts.extend([(subprompts[-1][0], 0.0)] * (parts - len(subprompts)))
    cond = tuple(tuple(subprompts[j][0] for subprompts in per_prompt) for j in range(parts))
    plain = parts == 1 and all(subprompts[0][1] == 1.0 for subprompts in per_prompt)
    weights = None if plain else tuple(tuple(subprompts[j][1] for subprompts in per_prompt) for j in range(parts))
    uncond = None if negatives is None else tuple(rows(negative) for negative in negatives)
    return PromptPlan(tuple(texts), cond, weights, uncond)
