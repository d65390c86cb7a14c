"""Answer extraction and normalisation for GSM8K, MATH and the commonsense suite.

All functions take plain strings and never raise on model output: a generation with no recognisable answer
yields ``None`` and is judged wrong. They raise only on programmer input (an unknown task name).

GSM8K (SPEC §5): references carry the final number after ``####``; from a generation take the number after
the last "The answer is" (MetaMath's answer line), else the last number in the text; compare numerically
after removing thousands commas, ``$`` and trailing zeros (``18.00`` == ``18``).

MATH: the content of the last ``\\boxed{...}`` (nested braces respected; MetaMath-style "The answer is: X"
as a fall-back), normalised with the standard MATH normalisation of Hendrycks et al. (``strip_string`` in
their ``math_equivalence.py``): line breaks, ``\\!``, ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac``,
``^\\circ``, ``\\$``, unit text, ``\\%``, leading ``.5``, a short ``x =`` prefix, ``\\sqrt2``, spaces,
``\\frac12``, ``0.5`` → ``\\frac{1}{2}`` and ``a/b`` → ``\\frac{a}{b}``; then exact string match.

Commonsense (LLM-Adapters' evaluation): the first word of the task's answer vocabulary that occurs in the
generation (``true``/``false``, ``solution1/2``, ``answer1..5``, ``option1/2``, ``ending1..4``).
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "CHOICE_VOCABULARY",
    "COMMONSENSE_TASKS",
    "MATH_TASKS",
    "choice_answer",
    "choice_is_correct",
    "gsm8k_answer",
    "gsm8k_is_correct",
    "gsm8k_reference",
    "is_correct",
    "last_boxed",
    "math_answer",
    "math_is_correct",
    "normalize_math_answer",
    "parse_number",
    "strip_continuation",
]

COMMONSENSE_TASKS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Challenge",
    "ARC-Easy",
    "openbookqa",
)
"""The eight commonsense reasoning tasks of the LLM-Adapters / DoRA / PiSSA evaluation suite."""

_ANSWER_N = tuple(f"answer{i}" for i in range(1, 6))
CHOICE_VOCABULARY: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": _ANSWER_N,
    "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"),
    "ARC-Challenge": _ANSWER_N,
    "ARC-Easy": _ANSWER_N,
    "openbookqa": _ANSWER_N,
}
"""Answer words per commonsense task (LLM-Adapters' ``extract_answer`` regexes)."""

MATH_TASKS: tuple[str, ...] = ("gsm8k", "math")
"""Task names of the two math benchmarks, as used in eval batches' ``"task"`` field."""

# Markers after which an instruction-tuned model has started to invent the next example; MetaMath's own
# evaluation stops generation at the same strings.
_CONTINUATION = re.compile(r"\n*(?:###\s*)?(?:Instruction|Response)\s*:|\n\s*###(?!#)")


def strip_continuation(generation: str) -> str:
    """Cut a generation where the model starts a new Alpaca block (``### Instruction:`` etc.).

    Args:
        generation: decoded model output (the new tokens only).

    Returns:
        The generation up to the first continuation marker.
    """
    match = _CONTINUATION.search(generation)
    return generation[: match.start()] if match else generation


# ------------------------------------------------------------------------------------------------ GSM8K

# A number: optional sign, optional "$", digits with optional thousands commas, optional decimals, or a
# plain fraction "3/4". Thousands groups must have exactly three digits so "3,4,5" stays three numbers.
_NUMBER = re.compile(r"-?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is", re.IGNORECASE)


def parse_number(text: str) -> Fraction | None:
    """Parse a number written the GSM8K way into an exact fraction.

    Args:
        text: e.g. ``"1,234"``, ``"$18.00"``, ``"-3"``, ``"0.5"``, ``"3/4"``.

    Returns:
        The exact value, or ``None`` when ``text`` is not a number (or a fraction with denominator 0).
    """
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not cleaned:
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _format_number(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    # Terminating decimals print as decimals ("0.5"), others as fractions ("1/3").
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator == 1:
        return format(value.numerator / value.denominator, "f").rstrip("0").rstrip(".")
    return f"{value.numerator}/{value.denominator}"


def gsm8k_reference(solution: str) -> str:
    """The final answer of a GSM8K reference solution (the text after ``####``), normalised.

    Args:
        solution: GSM8K's ``answer`` field, ending in ``#### <number>``.

    Returns:
        The normalised number, e.g. ``"18"``.

    Raises:
        ValueError: when the solution has no ``####`` line or no number after it.
    """
    if "####" not in solution:
        raise ValueError(f"GSM8K solution has no '####' answer line: {solution[-80:]!r}")
    tail = solution.rsplit("####", 1)[1]
    value = parse_number(tail)
    if value is None:
        raise ValueError(f"GSM8K answer after '####' is not a number: {tail.strip()!r}")
    return _format_number(value)


def gsm8k_answer(generation: str) -> str | None:
    """Extract the final numeric answer from a model's GSM8K generation.

    The number right after the last "The answer is" wins; without that phrase (or without a number after
    it) the last number in the text is used.

    Args:
        generation: decoded model output (new tokens only).

    Returns:
        The normalised number (``"1234"``, ``"18"``, ``"0.5"``), or ``None`` when the text has no number.
    """
    text = strip_continuation(generation)
    phrases = list(_ANSWER_IS.finditer(text))
    if phrases:
        after = _NUMBER.search(text, phrases[-1].end())
        if after is not None:
            value = parse_number(after.group())
            if value is not None:
                return _format_number(value)
    for match in reversed(list(_NUMBER.finditer(text))):
        value = parse_number(match.group())
        if value is not None:
            return _format_number(value)
    return None


def gsm8k_is_correct(generation: str, reference: str) -> bool:
    """Whether a generation's GSM8K answer equals the reference numerically.

    Args:
        generation: decoded model output.
        reference: the reference answer, either a bare number (``"18"``) or a full GSM8K solution with
            ``####``.

    Returns:
        ``True`` iff both parse and are numerically equal.
    """
    predicted = gsm8k_answer(generation)
    if predicted is None:
        return False
    expected = parse_number(gsm8k_reference(reference) if "####" in reference else reference)
    return expected is not None and parse_number(predicted) == expected


# ------------------------------------------------------------------------------------------------- MATH


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces respected.

    Args:
        text: a MATH solution or a model generation.

    Returns:
        The content between the braces (``"\\frac{1}{2}"`` for ``\\boxed{\\frac{1}{2}}``), the token after
        ``\\boxed `` for the brace-less form (``\\boxed 5``), or ``None`` when there is no complete box.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    position = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith(" ", position):
        # "\boxed 5": the argument is the next run of non-space characters (up to "$" ending the math).
        rest = text[position + 1 :].split("$", 1)[0].strip()
        return rest.split()[0] if rest else None
    if not text.startswith("{", position):
        return None
    depth = 0
    for index in range(position, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[position + 1 : index]
    return None  # unbalanced: the generation was cut off inside the box


def math_answer(generation: str) -> str | None:
    """Extract the final answer from a MATH solution or generation (not normalised).

    Args:
        generation: text containing ``\\boxed{...}`` or MetaMath's "The answer is: X".

    Returns:
        The raw answer string, or ``None`` when there is none.
    """
    text = strip_continuation(generation)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    phrases = list(_ANSWER_IS.finditer(text))
    if phrases:
        answer = text[phrases[-1].end() :].lstrip(" :").strip()
        # A sentence-final period is punctuation, not part of the answer; "$...$" is math-mode markup.
        answer = answer.rstrip(".").strip().strip("$").strip()
        return answer or None
    return None


def _split_off_units(text: str) -> str:
    # Hendrycks: "\text{ " (with a space) only ever introduces units on the right ("5\text{ cm}").
    # "\mbox{ cm}" is the same; the unit text is dropped when there is a value in front of it.
    for marker in ("\\text{ ", "\\mbox{ "):
        if marker in text:
            value = text.split(marker)[0]
            if value.strip():
                return value
    return text


def _fix_sqrt(text: str) -> str:
    # "\sqrt2" -> "\sqrt{2}" (one character argument, as TeX reads it)
    return re.sub(r"\\sqrt(?!\s*[{\[])\s*(\w)", r"\\sqrt{\1}", text)


def _fix_fracs(text: str) -> str:
    # "\frac12" -> "\frac{1}{2}", "\frac1b" -> "\frac{1}{b}", "\frac1{72}" -> "\frac{1}{72}";
    # TeX reads an unbraced argument as one character.
    pieces = text.split("\\frac")
    fixed = pieces[0]
    for piece in pieces[1:]:
        fixed += "\\frac"
        if piece.startswith("{"):
            fixed += piece
            continue
        if len(piece) < 2:
            return text  # malformed ("\frac" at the very end); leave it alone
        numerator, rest = piece[0], piece[1:]
        if rest.startswith("{"):
            fixed += "{" + numerator + "}" + rest
        else:
            fixed += "{" + numerator + "}{" + rest[0] + "}" + rest[1:]
    return fixed


def _fix_a_slash_b(text: str) -> str:
    # "3/4" -> "\frac{3}{4}" for plain integers only (the MATH answers write fractions as \frac).
    match = re.fullmatch(r"(-?\d+)/(\d+)", text)
    if match is None:
        return text
    return f"\\frac{{{int(match.group(1))}}}{{{int(match.group(2))}}}"


def normalize_math_answer(answer: str) -> str:
    """MATH's standard answer normalisation (Hendrycks et al.'s ``strip_string``, re-implemented).

    Args:
        answer: a raw answer, e.g. ``"\\dfrac12"``, ``"90^\\circ"``, ``"x = 5"``, ``"10\\text{ cm}"``.

    Returns:
        The canonical form, e.g. ``"\\frac{1}{2}"``, ``"90"``, ``"5"``, ``"10"``; two answers are equal iff
        their canonical forms are equal.
    """
    text = answer.strip()
    text = text.replace("\n", "").replace("\\!", "")
    text = text.replace("\\\\", "\\")
    text = text.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ", "", text)
    text = text.replace("\\$", "")
    text = _split_off_units(text)
    text = text.replace("\\%", "").replace("%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if text.startswith("."):
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:
        # "x = 5", "k=3": a one- or two-letter left-hand side names the unknown
        text = sides[1]
    text = _fix_sqrt(text)
    text = text.replace(" ", "")
    text = _fix_fracs(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _fix_a_slash_b(text)


def math_is_correct(generation: str, reference: str) -> bool:
    """Whether a generation's MATH answer equals the reference after normalisation.

    Args:
        generation: decoded model output (or a solution with ``\\boxed{}``).
        reference: the reference answer string (MATH-500's ``answer`` or the boxed content of a solution).

    Returns:
        ``True`` iff an answer was extracted and its normal form equals the reference's.
    """
    predicted = math_answer(generation)
    if predicted is None:
        return False
    return normalize_math_answer(predicted) == normalize_math_answer(reference)


# ------------------------------------------------------------------------------------------ commonsense


def _check_task(task: str) -> None:
    if task not in CHOICE_VOCABULARY:
        raise ValueError(f"unknown commonsense task {task!r}; choose one of: {', '.join(COMMONSENSE_TASKS)}")


def choice_answer(generation: str, task: str) -> str | None:
    """The first answer word of ``task``'s vocabulary that occurs in the generation.

    Args:
        generation: decoded model output, e.g. ``"the correct answer is answer3"``.
        task: one of :data:`COMMONSENSE_TASKS`.

    Returns:
        The lower-case answer word (``"answer3"``, ``"true"``), or ``None`` when none occurs.

    Raises:
        ValueError: for an unknown task name.
    """
    _check_task(task)
    words = "|".join(CHOICE_VOCABULARY[task])
    match = re.search(rf"\b({words})\b", strip_continuation(generation).lower())
    return match.group(1) if match else None


def choice_is_correct(generation: str, reference: str, task: str) -> bool:
    """Whether the generation's first answer word equals the gold answer word.

    Args:
        generation: decoded model output.
        reference: the gold answer word (the ``answer`` field), e.g. ``"option2"``.
        task: one of :data:`COMMONSENSE_TASKS`.

    Returns:
        ``True`` iff an answer word was found and equals ``reference`` (case-insensitive).
    """
    predicted = choice_answer(generation, task)
    return predicted is not None and predicted == reference.strip().lower()


def is_correct(generation: str, reference: str, task: str) -> bool:
    """Judge one generation for any supported task.

    Args:
        generation: decoded model output.
        reference: the reference answer for that example.
        task: ``"gsm8k"``, ``"math"`` or a commonsense task name.

    Returns:
        Whether the generation is counted correct.

    Raises:
        ValueError: for an unknown task name.
    """
    if task == "gsm8k":
        return gsm8k_is_correct(generation, reference)
    if task == "math":
        return math_is_correct(generation, reference)
    if task in CHOICE_VOCABULARY:
        return choice_is_correct(generation, reference, task)
    known = ", ".join((*MATH_TASKS, *COMMONSENSE_TASKS))
    raise ValueError(f"unknown evaluation task {task!r}; choose one of: {known}")
