"""Write GSM8K (and MATH) training files as a MetaMathQA-format JSON: an offline stand-in for MetaMathQA.

MetaMathQA (395K records, Hub id ``meta-math/MetaMathQA``) is not in ``../shared/data``. Its ``GSM_AnsAug``
and ``MATH_AnsAug`` records are GSM8K / MATH training questions with a worked answer that ends in
"The answer is: X"; this script builds such records from the reference solutions, so that
``recipes/metamath_sorsa.py`` runs offline on real data::

    python recipes/tools/gsm8k_as_metamathqa.py ../shared/data/gsm8k/train.jsonl \\
        runs/metamathqa_standin/MetaMathQA-395K.json [--math ../shared/data/math/train.jsonl]
    lightning run recipes/metamath_sorsa.py --data.data_dir runs/metamathqa_standin \\
        --data.gsm8k_dir ../shared/data/gsm8k --data.math_dir ../shared/data/math500

The stand-in has 7,473 GSM8K records (+ 7,500 with ``--math``), not MetaMathQA's rephrased and backward
questions: it exercises the recipe, it does not reproduce the papers' MetaMathQA numbers.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from lit_svd.data import clean_gsm8k_solution
from lit_svd.eval import last_boxed


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file."""
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def metamathqa_records(gsm8k: Sequence[dict], math: Sequence[dict] = ()) -> list[dict]:
    """MetaMathQA-schema records ``{query, response, type, original_question}`` from GSM8K / MATH records.

    Args:
        gsm8k: ``{question, answer}`` records (the answer ends in ``#### N``).
        math: ``{problem, solution}`` records (the solution holds a ``\\boxed{}`` answer).
    """
    records = [
        {
            "query": r["question"],
            "response": clean_gsm8k_solution(r["answer"]),  # "... The answer is: N", as in MetaMathQA
            "type": "GSM_AnsAug",
            "original_question": r["question"],
        }
        for r in gsm8k
    ]
    records += [
        {
            "query": r["problem"],
            "response": f"{r['solution'].rstrip()}\nThe answer is: {last_boxed(r['solution']) or ''}",
            "type": "MATH_AnsAug",
            "original_question": r["problem"],
        }
        for r in math
    ]
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gsm8k_train", type=Path, help="GSM8K train.jsonl")
    parser.add_argument("output", type=Path, help="the JSON file to write (e.g. DIR/MetaMathQA-395K.json)")
    parser.add_argument("--math", type=Path, default=None, help="also MATH's train.jsonl")
    args = parser.parse_args(argv)
    for path in (args.gsm8k_train, args.math):
        if path is not None and not path.is_file():
            parser.error(f"file not found: {path}")
    records = metamathqa_records(read_jsonl(args.gsm8k_train), read_jsonl(args.math) if args.math else [])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(records))
    print(f"wrote {len(records)} MetaMathQA-format records to {args.output}")


if __name__ == "__main__":
    main()
