"""Instruction-tuning datamodules (GSM8K, MATH, MetaMathQA, Commonsense) and prompt templates.

Nothing here knows about adapters: a datamodule needs only a tokenizer (see ``InstructionDataModule``).
"""

from lit_svd.data.base import (
    CANONICAL_COLUMNS,
    DataSourceError,
    InstructionCollator,
    InstructionDataModule,
    LengthGroupedSampler,
    ResumableDataLoader,
    TokenBudgetSampler,
    non_padding_tokens,
    pack_padded_batch,
    tokenize_instructions,
)
from lit_svd.data.commonsense import CommonsenseDataModule, load_commonsense_file
from lit_svd.data.math import (
    GSM8KDataModule,
    MATHDataModule,
    MetaMathQADataModule,
    clean_gsm8k_solution,
    load_gsm8k,
    load_math,
    load_metamathqa,
)
from lit_svd.data.prompts import ALPACA_INPUT_TEMPLATE, ALPACA_TEMPLATE, build_prompt

__all__ = [
    "ALPACA_INPUT_TEMPLATE",
    "ALPACA_TEMPLATE",
    "CANONICAL_COLUMNS",
    "CommonsenseDataModule",
    "DataSourceError",
    "GSM8KDataModule",
    "InstructionCollator",
    "InstructionDataModule",
    "LengthGroupedSampler",
    "ResumableDataLoader",
    "TokenBudgetSampler",
    "MATHDataModule",
    "MetaMathQADataModule",
    "build_prompt",
    "clean_gsm8k_solution",
    "load_commonsense_file",
    "load_gsm8k",
    "load_math",
    "load_metamathqa",
    "non_padding_tokens",
    "pack_padded_batch",
    "tokenize_instructions",
]
