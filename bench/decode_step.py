"""Where a decoding step of batched GSM8K generation spends its time: per attention backend, eager vs graphed.

One batch of GSM8K test prompts (dataset order, left-padded), prefilled into a static cache of prompt +
``--max-new-tokens`` columns by :class:`lit_svd.eval.decode.GraphedGreedyDecoder`; then its decoding step
timed (CUDA events, after warm-up) eagerly under each ``scaled_dot_product_attention`` backend that accepts
a mask, replayed as a CUDA graph, and profiled (top kernels). Alongside: the bytes a step must read at
least — the weights once and every row's K/V cache columns — and the step time that would take at the
GPU's memory bandwidth (``--bandwidth``, TB/s).

Usage:
    PYTHONPATH=.:bench python bench/decode_step.py --model /tmp/llama7b --data-dir data/gsm8k --batch-size 256
    PYTHONPATH=.:bench python bench/decode_step.py --smoke --data-dir data/gsm8k     # tiny model, CPU ok
"""

from __future__ import annotations

import argparse
import gc
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS_DIR, device_profiler, environment, random_llama, time_steps, top_operators, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel

from lit_svd.data import GSM8KDataModule
from lit_svd.eval.decode import GraphedGreedyDecoder, capture_step
from lit_svd.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer

BACKENDS = {
    "default": None,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def minimum_bytes(model: Any, decoder: GraphedGreedyDecoder) -> int:
    """Weights once plus the K/V columns every row attends over, in the cache's dtype."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in decoder.cache.layers)
    return weights + cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--data-dir", required=True, help="folder with GSM8K test.jsonl")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--bandwidth", type=float, default=4.8, help="TB/s, for the bound column (H200: 4.8)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, batch 4: checks the script")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "decode_step.json")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(EMBEDDED_MODEL if args.smoke else args.model)
    if args.smoke:
        args.batch_size, args.max_new_tokens, args.steps = 4, 16, 3
        model = random_llama(
            layers=2, hidden=64, intermediate=128, heads=4, vocab=len(tokenizer), device=device, dtype=dtype
        )
    else:
        model = load_causal_lm(args.model, dtype=dtype).to(device)
    model.eval()
    data = GSM8KDataModule(data_dir=args.data_dir, max_eval_examples=args.batch_size, eval_batch_size=args.batch_size)
    data.set_tokenizer(tokenizer)
    data.setup("test")
    batch = next(iter(data.eval_dataloader()))
    ids = batch["prompt_input_ids"].to(device)
    mask = batch["prompt_attention_mask"].to(device)
    eos = [tokenizer.eos_token_id]
    results: dict[str, Any] = {
        "meta": environment(device)
        | {"model": args.model, "batch": list(ids.shape), "max_new_tokens": args.max_new_tokens},
        "runs": [],
    }
    warmup = 2 if args.smoke else 5

    def fresh() -> GraphedGreedyDecoder:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return GraphedGreedyDecoder(model, ids, mask, args.max_new_tokens, eos, tokenizer.eos_token_id)

    with torch.no_grad():
        for name, backend in BACKENDS.items():
            context = sdpa_kernel([backend]) if backend is not None else nullcontext()
            try:
                with context:
                    decoder = fresh()
                    row = time_steps(decoder.step, device, warmup, args.steps, ids.shape[0])
            except RuntimeError as err:  # a backend that refuses this mask/shape
                row = {"error": repr(err)[:300]}
            results["runs"].append({"variant": f"eager, sdpa {name}"} | row)
            print(
                results["runs"][-1] if "error" in row else f"eager, sdpa {name}: {row['step_ms']:.2f} ms/step",
                flush=True,
            )
        decoder = fresh()
        results["minimum_gb"] = minimum_bytes(model, decoder) / 1e9
        results["bound_ms"] = results["minimum_gb"] / args.bandwidth  # GB / (TB/s) = ms
        if device.type == "cuda":
            replay = capture_step(decoder.step)
            row = time_steps(replay, device, warmup, args.steps, ids.shape[0])
            results["runs"].append({"variant": "CUDA graph, sdpa default"} | row)
            print(f"CUDA graph: {row['step_ms']:.2f} ms/step", flush=True)
            decoder = fresh()
        for _ in range(warmup):
            decoder.step()
        with device_profiler(device) as capture:
            for _ in range(5):
                decoder.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        results["top_kernels"] = top_operators(capture, device, top=15, steps=5)
    bound = f"{results['bound_ms']:.2f} ms at {args.bandwidth} TB/s"
    print(f"minimum bytes per step {results['minimum_gb']:.1f} GB -> {bound}")
    for op in results["top_kernels"]:
        print(f"  {op['ms']:8.3f} ms  {op['calls']:6.1f}x  {op['name'][:110]}")
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
