"""Quantization error of every method with a 4-bit NF4 base, on SmolLM2-135M-Instruct's real weights.

For each method and rank r ∈ {16, 64}, with ``base_quantization="nf4"`` on all 7 projections of all 30
decoder layers (210 matrices), the init is run as in training and then measured:

- ``ratio``: ‖W − (deq(Q(W_res)) + delta)‖_F / ‖W − deq(Q(W))‖_F, summed over the 210 matrices (squared
  numerators and denominators added first) and per projection type; QLoRA (LoRA, delta = 0, base = NF4(W))
  is 1 by definition; < 1 means the method's 4-bit model starts closer to the full-precision one;
- ``max_abs_dlogit``: max |logit − full-precision logit| over a few real prompts, at init (also the mean, and
  how often the top-1 next token agrees with the full-precision model's).

Usage: ``PYTHONPATH=. python bench/quantization.py [--ranks 16 64] [--methods lora pissa …]`` (CPU, a few
minutes) → bench/results/quantization_error.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict
from pathlib import Path

import torch
from _common import RESULTS_DIR, environment, format_table, write_json

from lit_svd import AdapterConfig, adapter_layers, inject_adapters
from lit_svd.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer
from lit_svd.quantization import nf4_round_trip

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
]
# (method, loftq_iters); LoftQ at any of 1..10 iterations.
RUNS = [("lora", 1), ("pissa", 1), ("sorsa", 1), ("osora", 1), ("olora", 1), ("milora", 1)]
RUNS += [("loftq", iters) for iters in range(1, 11)]  # --loftq-iters picks (default 1 and 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument(
        "--methods", nargs="+", default=None, help="subset of: " + ", ".join(dict.fromkeys(m for m, _ in RUNS))
    )
    parser.add_argument("--loftq-iters", type=int, nargs="+", default=[1, 5], help="LoftQ's iteration counts to run")
    parser.add_argument("--output", default=str(RESULTS_DIR / "quantization_error.json"))
    args = parser.parse_args()
    runs = [run for run in RUNS if args.methods is None or run[0] in args.methods]
    runs = [(method, iters) for method, iters in runs if method != "loftq" or iters in args.loftq_iters]

    model = load_causal_lm(EMBEDDED_MODEL, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**batch).logits
    mask = batch["attention_mask"].bool()
    originals = {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTIONS
    }
    # ‖W − deq(Q(W))‖² per matrix: QLoRA's error, the denominator (with the default double quantization).
    qlora = {n: (w - nf4_round_trip(w)).norm().double() ** 2 for n, w in originals.items()}

    rows, results = [], []
    for rank in args.ranks:
        for method, iters in runs:
            start = time.perf_counter()
            adapted = copy.deepcopy(model)
            config = AdapterConfig(
                method=method, rank=rank, target_modules=PROJECTIONS, base_quantization="nf4", loftq_iters=iters
            )
            inject_adapters(adapted, config)
            seconds = time.perf_counter() - start
            numerator, denominator = defaultdict(float), defaultdict(float)
            with torch.no_grad():
                for name, layer in adapter_layers(adapted):
                    error = (originals[name] - (layer.weight_matrix().float() + layer.delta_weight())).norm() ** 2
                    kind = name.rsplit(".", 1)[-1]
                    for key in ("all", kind):
                        numerator[key] += error.double().item()
                        denominator[key] += qlora[name].item()
                logits = adapted(**batch).logits
            ratio = {k: (numerator[k] / denominator[k]) ** 0.5 for k in numerator}
            difference = (logits - reference).abs()[mask]  # (valid tokens, vocab)
            dlogit = difference.max().item()
            top1 = (logits.argmax(-1) == reference.argmax(-1))[mask].float().mean().item()
            label = method if method != "loftq" else f"loftq (iters={iters})"
            results.append(
                {"method": method, "loftq_iters": iters, "rank": rank, "ratio": ratio, "max_abs_dlogit": dlogit}
                | {"mean_abs_dlogit": difference.mean().item(), "top1_agreement": top1, "init_seconds": seconds}
            )
            rows.append({"rank": rank, "method": label, "ratio": ratio["all"], "max|Δlogit|": dlogit} | ratio)
            print(
                f"r={rank} {label}: ratio {ratio['all']:.4f}, max |Δlogit| {dlogit:.3f}, top-1 agreement {top1:.3f} "
                f"({seconds:.1f}s)",
                flush=True,
            )
            del adapted

    payload = {
        "environment": environment(torch.device("cpu")),
        "model": EMBEDDED_MODEL,
        "projections": PROJECTIONS,
        "matrices": len(originals),
        "prompts": PROMPTS,
        "quantization": "nf4, blocksize 64, double quantization (bitsandbytes)",
        "qlora_relative_error": (sum(qlora.values()) / sum(w.norm().double() ** 2 for w in originals.values()))
        .sqrt()
        .item(),
        "results": results,
    }
    write_json(Path(args.output), payload)
    fmt = {k: "{:.4f}".format for k in ["ratio", *PROJECTIONS]} | {"max|Δlogit|": "{:.3f}".format}
    print(format_table(rows, ["rank", "method", "ratio", *PROJECTIONS, "max|Δlogit|"], fmt))


if __name__ == "__main__":
    main()
