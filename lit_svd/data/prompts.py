"""Prompt templates, all in one place.

The default is the Alpaca-style instruction template that the MetaMath, PiSSA and SORSA papers (and the
LLM-Adapters commonsense suite) train and evaluate with. A record is turned into two strings:

    prompt   = template.format(query=..., input=...)     # ends with "### Response:"
    response = separator + answer text                  # the only tokens that carry loss

The prompt and the response are tokenised separately and concatenated, so the boundary between "no loss"
and "loss" is exact (see ``lit_svd.data.base``). ``separator`` is a single space for the Alpaca template,
so that "### Response: Janet sells..." reads naturally, and empty for chat templates, whose assistant turn
already starts on a fresh line.

``template`` names understood everywhere in ``lit_svd.data``:

- ``"alpaca"``: :data:`ALPACA_TEMPLATE` (or :data:`ALPACA_INPUT_TEMPLATE` when the record has an ``input``);
- ``"chat"``: the tokenizer's own chat template with the query as one user message;
- any other string containing ``{query}`` (and optionally ``{input}``): a custom format string.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ALPACA_INPUT_TEMPLATE",
    "ALPACA_TEMPLATE",
    "build_prompt",
    "response_separator",
    "validate_template",
]

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{query}\n\n### Response:"
)
"""The Alpaca prompt without input, verbatim as used by MetaMath / PiSSA / SORSA."""

ALPACA_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{query}\n\n"
    "### Input:\n{input}\n\n### Response:"
)
"""The Alpaca prompt for records with a non-empty ``input`` field (LLM-Adapters' format)."""


def validate_template(template: str) -> None:
    """Check a template name or custom format string.

    Args:
        template: ``"alpaca"``, ``"chat"``, or a format string containing ``{query}``.

    Raises:
        ValueError: when the template is neither a known name nor a format string with ``{query}``.
    """
    if template in ("alpaca", "chat"):
        return
    if "{query}" not in template:
        raise ValueError(
            f"prompt template {template!r} is neither 'alpaca' nor 'chat' and has no '{{query}}' "
            "placeholder; pass 'alpaca', 'chat', or a format string such as 'Q: {query}\\nA:'"
        )


def build_prompt(query: str, input_text: str = "", template: str = "alpaca", tokenizer: Any = None) -> str:
    """Format one prompt (everything the model sees before its answer).

    Args:
        query: the instruction / question.
        input_text: optional extra context (Alpaca's ``input`` field); empty for GSM8K, MATH, MetaMathQA
            and the commonsense suite.
        template: ``"alpaca"``, ``"chat"`` or a custom format string with ``{query}`` (and ``{input}``).
        tokenizer: a Hugging Face tokenizer; required for ``"chat"`` (its ``apply_chat_template`` is used).

    Returns:
        The prompt text. For ``"chat"`` it already contains the template's special tokens and ends with the
        assistant generation prefix, so it must be tokenised with ``add_special_tokens=False``.
    """
    validate_template(template)
    if template == "alpaca":
        if input_text:
            return ALPACA_INPUT_TEMPLATE.format(query=query, input=input_text)
        return ALPACA_TEMPLATE.format(query=query)
    if template == "chat":
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "prompt template 'chat' needs a tokenizer with a chat template; this tokenizer has none, "
                "use prompt_template='alpaca'"
            )
        content = f"{query}\n\n{input_text}" if input_text else query
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return template.format(query=query, input=input_text)


def response_separator(template: str, tokenizer: Any = None) -> str:
    """Text put between the prompt and the response when the response is tokenised on its own.

    Args:
        template: the template name or format string (see module docstring).
        tokenizer: the tokenizer; SentencePiece tokenizers that add a dummy prefix space ("▁") to every
            separately tokenised string already produce the space, so they get an empty separator.

    Returns:
        ``" "`` for text templates (``"### Response: 18"``), ``""`` for chat templates or when the
        tokenizer adds its own prefix space.
    """
    if template == "chat":
        return ""
    if tokenizer is not None and _adds_prefix_space(tokenizer):
        return ""
    return " "


def _adds_prefix_space(tokenizer: Any) -> bool:
    # Llama-1/2-style SentencePiece tokenizers turn "a" into "▁a" when it is tokenised separately; adding our
    # own space would then produce a stray "▁" token at the prompt/response boundary.
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    if not ids:
        return False
    first_piece = tokenizer.convert_ids_to_tokens(ids[0])
    return isinstance(first_piece, str) and first_piece.startswith("▁")
