"""GSM8K-test generation throughput: lit_svd's evaluation path vs batched HF ``generate``, in one run.

The anchor is what a user gets from transformers without thinking about it: ``model.generate`` (greedy,
default dynamic KV cache) over the test set in dataset order, 192 prompts per call. lit_svd's path is
``lit_svd.eval.evaluate``: prompts sorted by length into few large batches, optionally a static KV cache
whose decoding step transformers compiles into CUDA graphs. Both run on the same model (SmolLM2-135M-
Instruct, bf16 weights, bf16 autocast), the same prompts and the same budget (256 new tokens, stop at
EOS). Throughput counts generated tokens (up to and including EOS) per second of wall time; for compiled
variants the first pass (which compiles) and a second, steady-state pass are both reported.

Variants, each over all questions unless ``--questions``:
    anchor            HF generate, dataset order, batch 192, dynamic cache, base model
    ours/base         evaluate(): length-sorted, batch --batch-size, dynamic cache, base model
    ours/base/static-eager  the same with a static KV cache, not compiled (``static_cache=True``): written in place
                      instead of concatenated every step
    ours/base/static  the same with compile=True (static cache + CUDA graphs; CUDA only)
    ours/base/graphed greedy_decode(): static cache, the decoding step captured as a CUDA graph without
                      compiling (``graphed_decode=True``)
    ours/merged       SORSA r=16 on all 7 projections, merged into the weights, best of the above
    ours/unmerged     the same adapters left unmerged (adapter forward in every step), dynamic cache; and
                      with the best variant's settings when that is not the dynamic cache

Greedy outputs of ``ours/*`` on the base model are compared with the anchor's on the first 64 prompts.

Usage:
    PYTHONPATH=. python bench/generate.py --data-dir ../shared/data/gsm8k           # → bench/results/generate.json
    PYTHONPATH=. python bench/generate.py --data-dir ../shared/data/gsm8k --smoke   # 8 questions, CPU ok
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS_DIR, Timer, environment, format_table, write_json

from lit_svd import AdapterConfig, inject_adapters, merge_adapters
from lit_svd.data import GSM8KDataModule
from lit_svd.eval import evaluate, greedy_decode
from lit_svd.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer

# The module, not the function of the same name that lit_svd.eval exports: its greedy_decode gets wrapped.
evaluate_module = importlib.import_module("lit_svd.eval.evaluate")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tokens_through_eos(new: torch.Tensor, eos_token_id: int) -> list[int]:
    is_eos = new == eos_token_id
    return torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.shape[1]).tolist()


def count_generated_tokens(model: Any, eos_token_id: int) -> list[int]:
    """Wrap ``model.generate`` and lit_svd's ``greedy_decode`` so each call adds its rows' new-token counts
    (through EOS) to the returned list; :func:`stop_counting` undoes it."""
    counts: list[int] = []
    generate = model.generate

    @functools.wraps(generate)
    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        output = generate(*args, **kwargs)
        counts.extend(_tokens_through_eos(output[:, kwargs["input_ids"].shape[1] :], eos_token_id))
        return output

    @functools.wraps(greedy_decode)
    def counting_decode(*args: Any, **kwargs: Any) -> torch.Tensor:
        new = greedy_decode(*args, **kwargs)
        counts.extend(_tokens_through_eos(new, eos_token_id))
        return new

    model.generate = counting
    evaluate_module.greedy_decode = counting_decode
    return counts


def stop_counting(model: Any) -> None:
    del model.generate  # back to the class's method
    evaluate_module.greedy_decode = greedy_decode


def run_variant(
    name: str,
    model: Any,
    tokenizer: Any,
    args: argparse.Namespace,
    device: torch.device,
    autocast: bool = True,
    **evaluate_kwargs: Any,
) -> dict[str, Any]:
    data = GSM8KDataModule(
        data_dir=args.data_dir, max_eval_examples=args.questions, cache_dir=args.cache_dir, eval_batch_size=192
    )
    enabled = autocast and device.type == "cuda"
    passes = []  # (seconds, tokens); the fastest of --repeats passes is reported, all are recorded
    for _ in range(getattr(args, "repeats", 1)):
        counts = count_generated_tokens(model, tokenizer.eos_token_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled), Timer(device) as t:
            result = evaluate(
                model,
                tokenizer,
                data,
                max_new_tokens=args.max_new_tokens,
                progress=False,
                return_predictions=True,
                **evaluate_kwargs,
            )
        stop_counting(model)
        passes.append((t.seconds, sum(counts)))
    seconds, tokens = min(passes)
    row = {
        "variant": name,
        "questions": result["num_examples"],
        "batch_size": evaluate_kwargs.get("batch_size"),
        "sorted": evaluate_kwargs.get("sort_by_length", True),
        "compiled": evaluate_kwargs.get("compile", False),
        "static_cache": evaluate_kwargs.get("compile", False) or evaluate_kwargs.get("static_cache", False),
        "graphed_decode": evaluate_kwargs.get("graphed_decode", False),
        "seconds": seconds,
        "seconds_per_pass": [round(pass_seconds, 3) for pass_seconds, _ in passes],
        "generated_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "accuracy": result["accuracy"],
        "generations": [p["generation"] for p in result["predictions"]],
    }
    print(f"{name}: {row['tokens_per_s']:.0f} tok/s, {seconds:.1f} s, acc {row['accuracy']:.4f}", flush=True)
    return row


def identity_check(base: Any, tokenizer: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Greedy outputs on the first prompts, anchor vs lit_svd's path, in float32 and in bf16.

    bf16 GEMMs round differently for different batch shapes, and a 135M model often has near-tied logits,
    so bf16 greedy continuations drift apart after a while whatever the code path; HF's own generate at two
    batch sizes shows how much. In float32 both paths must agree token for token.
    """
    few = copy.copy(args)
    few.repeats = 1
    few.questions = args.identity_prompts
    out: dict[str, Any] = {"prompts": few.questions}
    fp32 = copy.deepcopy(base).float()
    runs = {
        "fp32 anchor": run_variant(
            "fp32 anchor", fp32, tokenizer, few, device, False, batch_size=args.anchor_batch, sort_by_length=False
        ),
        "fp32 ours": run_variant("fp32 ours", fp32, tokenizer, few, device, False, batch_size=args.batch_size),
        "bf16 anchor": run_variant(
            "bf16 anchor", base, tokenizer, few, device, batch_size=args.anchor_batch, sort_by_length=False
        ),
        "bf16 anchor, batch 32": run_variant(
            "bf16 anchor, batch 32", base, tokenizer, few, device, batch_size=32, sort_by_length=False
        ),
        "bf16 ours": run_variant("bf16 ours", base, tokenizer, few, device, batch_size=args.batch_size),
    }
    runs["fp32 ours graphed"] = run_variant(
        "fp32 ours graphed", fp32, tokenizer, few, device, False, batch_size=args.batch_size, graphed_decode=True
    )
    if device.type == "cuda" and not args.no_compile:
        runs["fp32 ours static"] = run_variant(
            "fp32 ours static", fp32, tokenizer, few, device, False, batch_size=args.batch_size, compile=True
        )
    del fp32
    pairs = [
        ("fp32 ours", "fp32 anchor"),
        ("fp32 ours static", "fp32 anchor"),
        ("fp32 ours graphed", "fp32 anchor"),
        ("bf16 ours", "bf16 anchor"),
        ("bf16 anchor, batch 32", "bf16 anchor"),
    ]
    for a, b in pairs:
        if a in runs and b in runs:
            out[f"identical: {a} vs {b}"] = sum(
                x == y for x, y in zip(runs[a]["generations"], runs[b]["generations"], strict=True)
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--data-dir", required=True, help="folder with GSM8K test.jsonl")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--questions", type=int, default=None, help="first N test questions (default all 1319)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--anchor-batch", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=1319, help="lit_svd path: prompts per generate call")
    p.add_argument("--no-compile", action="store_true", help="skip the static-cache/CUDA-graph variants")
    p.add_argument("--identity-prompts", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="timed passes per variant; the fastest is reported")
    p.add_argument("--smoke", action="store_true", help="8 questions, 16 new tokens: checks the script")
    p.add_argument("--only-identity", action="store_true", help="only the output-identity check (first prompts)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "generate.json")
    args = p.parse_args()
    if args.smoke:
        args.questions, args.max_new_tokens, args.batch_size, args.anchor_batch = 8, 16, 8, 3
        args.identity_prompts = 8
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(args.model)
    base = load_causal_lm(args.model, dtype=dtype).to(device)
    results: dict[str, Any] = {"meta": environment(device) | {"model": args.model}, "runs": []}
    compile_ok = device.type == "cuda" and not args.no_compile

    def save() -> None:
        write_json(args.out, results)

    # A short warm-up pass so CUDA/cuBLAS initialisation is not charged to whichever variant runs first.
    warm = copy.copy(args)
    warm.questions, warm.max_new_tokens, warm.repeats = 8, 8, 1
    run_variant("warm-up", base, tokenizer, warm, device, batch_size=8, sort_by_length=False)

    results["identity"] = identity_check(base, tokenizer, args, device)
    save()
    print("identity:", results["identity"], flush=True)
    if args.only_identity:
        return
    runs = results["runs"]
    runs.append(
        run_variant("anchor", base, tokenizer, args, device, batch_size=args.anchor_batch, sort_by_length=False)
    )
    save()
    runs.append(run_variant("ours/base", base, tokenizer, args, device, batch_size=args.batch_size))
    save()
    runs.append(
        run_variant(
            "ours/base/static-eager", base, tokenizer, args, device, batch_size=args.batch_size, static_cache=True
        )
    )
    save()
    try:
        runs.append(
            run_variant(
                "ours/base/graphed", base, tokenizer, args, device, batch_size=args.batch_size, graphed_decode=True
            )
        )
    except Exception as err:  # report and go on to the other variants
        runs.append({"variant": "ours/base/graphed", "error": repr(err)[:500]})
        print(f"graphed variant failed: {err!r}"[:500], flush=True)
    save()
    if compile_ok:
        for attempt in ("first pass", "second pass"):
            try:
                runs.append(
                    run_variant(
                        f"ours/base/static ({attempt})",
                        base,
                        tokenizer,
                        args,
                        device,
                        batch_size=args.batch_size,
                        compile=True,
                    )
                )
            except Exception as err:  # report and go on: compilation support varies across versions
                runs.append({"variant": f"ours/base/static ({attempt})", "error": repr(err)[:500]})
                print(f"static/compiled variant failed: {err!r}"[:500], flush=True)
                break
            save()
    steady = [
        r for r in runs if r["variant"].startswith("ours/base") and "error" not in r and "first" not in r["variant"]
    ]
    best = max(steady, key=lambda r: r["tokens_per_s"])
    best_kwargs = {
        "batch_size": args.batch_size,
        "compile": best["compiled"],
        "static_cache": best["static_cache"],
        "graphed_decode": best["graphed_decode"],
    }

    adapted = copy.deepcopy(base)
    inject_adapters(adapted, AdapterConfig(method="sorsa", rank=16, target_modules=TARGETS, adapter_dtype="float32"))
    runs.append(run_variant("ours/unmerged (sorsa r=16)", adapted, tokenizer, args, device, batch_size=args.batch_size))
    save()
    if best["static_cache"] or best["graphed_decode"]:
        runs.append(run_variant("ours/unmerged (sorsa r=16), best", adapted, tokenizer, args, device, **best_kwargs))
        save()
    merged = merge_adapters(adapted)
    runs.append(run_variant("ours/merged (sorsa r=16)", merged, tokenizer, args, device, **best_kwargs))
    save()

    anchor = runs[0]
    n = args.identity_prompts
    for row in runs:
        if "error" in row:
            continue
        row["x_anchor"] = row["tokens_per_s"] / anchor["tokens_per_s"]
        row[f"identical_first_{n}"] = sum(
            a == b for a, b in zip(row["generations"][:n], anchor["generations"][:n], strict=True)
        )
    for row in runs:
        row.pop("generations", None)
    save()
    cols = [
        "variant",
        "batch_size",
        "seconds",
        "generated_tokens",
        "tokens_per_s",
        "x_anchor",
        "accuracy",
        f"identical_first_{n}",
    ]
    print(
        format_table(
            [r for r in runs if "error" not in r],
            cols,
            {
                "seconds": "{:.1f}".format,
                "tokens_per_s": "{:.0f}".format,
                "x_anchor": "{:.2f}".format,
                "accuracy": "{:.4f}".format,
            },
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
