"""Calibration + init time of the data-aware inits (CorDA, EVA, LoRA-GA): lit_svd vs PEFT, in one run.

A Llama-2-7B-shaped causal LM (random bf16 weights built on the device, SmolLM2's tokenizer and vocabulary)
is calibrated on the same batches of GSM8K train (the lit_svd datamodule, shuffled with its seed) by

- ours: ``inject_adapters(..., initialize=False)`` then ``lit_svd.calibration.calibrate`` (what ``SVDInit``
  runs inside ``fit``): the padded batches run as packed rows (``--no-pack``: as they are), statistics on the
  device, float32, one pass, then the init;
- PEFT 0.21: CorDA ``preprocess_corda`` (its hook takes one sequence per forward, so each row of each batch is
  run alone, padding dropped) + ``get_peft_model``; EVA ``get_peft_model(low_cpu_mem_usage=True)`` +
  ``initialize_lora_eva_weights`` on the batches (it cycles them until its estimates converge); LoRA-GA
  ``preprocess_loraga`` (a train step: forward + backward of each batch) + ``get_peft_model``.

Each run builds a fresh model, and is timed from the model with adapters not yet initialised (PEFT: the plain
model) to adapters ready, with device synchronisation; peak device memory is recorded. The issue's target:
ours ≥ 5× faster than PEFT's preprocessing for the same method.

Usage (results in bench/results/calibration.json, printed as a table):
    PYTHONPATH=. python bench/calibration.py                      # 7B shapes, r=16, 32 batches of 8 × ≤512
    PYTHONPATH=. python bench/calibration.py --smoke              # tiny shapes on any device, seconds
    PYTHONPATH=. python bench/calibration.py --runs ours:corda peft:corda --batches 8
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import traceback
from pathlib import Path
from typing import Any

import torch
from _common import (
    RESULTS_DIR,
    Timer,
    device_profiler,
    environment,
    format_table,
    gb,
    random_llama,
    top_operators,
    write_json,
)
from transformers import LlamaForCausalLM

from lit_svd import AdapterConfig, inject_adapters
from lit_svd.calibration import calibrate

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("corda", "eva", "loraga")
DEFAULT_RUNS = [f"{impl}:{method}" for method in METHODS for impl in ("ours", "peft")]
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def build_model(args: argparse.Namespace, vocab: int, device: torch.device) -> LlamaForCausalLM:
    """A random bf16 Llama of the requested shape, built directly on ``device``."""
    model = random_llama(
        layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, vocab=vocab,
        device=device,
    )  # fmt: skip
    return model.requires_grad_(False).eval()


def gsm8k_batches(args: argparse.Namespace) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The first ``args.batches`` training batches of GSM8K (SmolLM2 tokenizer) and the tokenizer's vocabulary."""
    from lit_svd.data import GSM8KDataModule
    from lit_svd.models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    data = GSM8KDataModule(
        data_dir=str(args.data_dir),
        max_length=args.seq,
        batch_size=args.batch,
        max_train_examples=args.batch * args.batches,
        cache_dir=str(args.cache_dir) if args.cache_dir else None,
    )
    data.set_tokenizer(tokenizer)
    data.setup("fit")
    batches = [b for _, b in zip(range(args.batches), data.train_dataloader(), strict=False)]
    keep = ("input_ids", "attention_mask", "labels")
    return [{k: b[k] for k in keep if k in b} for b in batches], len(tokenizer)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def run_ours(method: str, model, batches, args, device) -> dict[str, Any]:
    config = AdapterConfig(method=method, rank=args.rank, target_modules=MODULES)
    with Timer(device) as t:
        inject_adapters(model, config, initialize=False)
        report = calibrate(
            model, [_to(b, device) for b in batches], max_statistics_bytes=args.max_bytes, pack_batches=args.pack
        )
    return {
        "seconds": t.seconds,
        "calibration_seconds": report["calibration_seconds"],
        "pass_seconds": report["calibration_pass_seconds"],
        "finalize_seconds": report["calibration_finalize_seconds"],
        "init_seconds": report["seconds"],
        "passes": report["calibration_passes"],
        "packed": report["calibration_packed"],
        "statistics_gb": gb(report["calibration_peak_bytes"]),
    }


def run_peft(method: str, model, batches, args, device) -> dict[str, Any]:
    import peft

    on_device = [_to(b, device) for b in batches]
    if method == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        config = peft.LoraConfig(
            r=args.rank, lora_alpha=args.rank, target_modules=MODULES, init_lora_weights="corda",
            corda_config=CordaConfig(corda_method="ipm"),
        )  # fmt: skip

        def run_model() -> None:
            for b in on_device:  # PEFT's covariance hook squeezes the batch dimension: one sequence at a time
                for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
                    model(input_ids=ids[mask.bool()][None])

        with Timer(device) as t:
            preprocess_corda(model, config, run_model=run_model)
            peft.get_peft_model(model, config)
    elif method == "eva":
        from peft import EvaConfig, initialize_lora_eva_weights

        config = peft.LoraConfig(
            r=args.rank, lora_alpha=args.rank, target_modules=MODULES, init_lora_weights="eva", eva_config=EvaConfig()
        )
        with Timer(device) as t:
            wrapped = peft.get_peft_model(model, config, low_cpu_mem_usage=True)
            initialize_lora_eva_weights(wrapped, on_device, show_progress_bar=False)
    else:
        from peft import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config = peft.LoraConfig(
            r=args.rank, lora_alpha=args.rank, target_modules=MODULES, init_lora_weights="lora_ga",
            lora_ga_config=LoraGAConfig(),
        )  # fmt: skip

        def train_step() -> None:
            for b in on_device:
                model(**b).loss.backward()

        with Timer(device) as t:
            preprocess_loraga(model, config, train_step)
            peft.get_peft_model(model, config)
    return {"seconds": t.seconds}


def measure(run: str, batches, vocab: int, args, device) -> dict[str, Any]:
    impl, method = run.split(":")
    if impl not in ("ours", "peft") or method not in METHODS:
        raise ValueError(f"unknown run {run!r}; runs are ours|peft:{'|'.join(METHODS)}")
    model = build_model(args, vocab, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    if args.warmup:  # CUDA context, cuBLAS handles and kernels loaded before the clock starts, for both impls
        with torch.enable_grad():
            first = _to(batches[0], device)
            model.get_input_embeddings().weight.requires_grad_(True)
            model(**first).loss.backward()
            model.get_input_embeddings().weight.requires_grad_(False).grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    capture = device_profiler(device) if args.profile else contextlib.nullcontext()
    with capture, _attention_backends(impl, args.sdpa):
        result = (run_ours if impl == "ours" else run_peft)(method, model, batches, args, device)
    if args.profile:
        result["top_kernels"] = top_operators(capture, device)
        result["top_host"] = top_operators(capture, torch.device("cpu"), top=25)
        for title, rows in (("device", result["top_kernels"]), ("host (self)", result["top_host"])):
            print(f"  {run}: top {title} time", flush=True)
            for row in rows:
                print(f"  {run} {row['ms']:9.1f} ms {row['calls']:6.0f}x  {row['name'][:110]}", flush=True)
    if device.type == "cuda":
        result["peak_extra_gb"] = gb(torch.cuda.max_memory_allocated(device) - base)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"run": run, "impl": impl, "method": method} | result


@contextlib.contextmanager
def _attention_backends(impl: str, sdpa: str):
    """``--sdpa``: "shipped" runs each implementation as it is (ours leaves cuDNN attention out during calibration,
    PEFT takes PyTorch's choice); "default" gives both PyTorch's choice; "no-cudnn" gives both the same set as ours."""
    import lit_svd.calibration as calibration
    from lit_svd.attention import varying_shape_attention

    shipped = calibration.varying_shape_attention
    if sdpa == "default":
        calibration.varying_shape_attention = contextlib.nullcontext
    try:
        with varying_shape_attention() if sdpa == "no-cudnn" and impl == "peft" else contextlib.nullcontext():
            yield
    finally:
        calibration.varying_shape_attention = shipped


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 batches: checks the script in seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="impl:method, impl in ours|peft")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512, help="max tokens per example (data.max_length)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="time the first forward/backward too")
    p.add_argument("--sdpa", choices=["shipped", "default", "no-cudnn"], default="shipped", help="attention backends")
    p.add_argument("--profile", action="store_true", help="print each run's top kernels (torch.profiler)")
    p.add_argument(
        "--no-pack", dest="pack", action="store_const", const=False, default=None,
        help="ours: run the padded batches as they are (default: packed rows, as SVDInit does)",
    )  # fmt: skip
    p.add_argument("--max-bytes", type=int, default=None, help="ours: max_statistics_bytes (None: one pass)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--tokenizer", default=None, help="Hub id or local folder (default: the embedded SmolLM2)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "calibration.json")
    args = p.parse_args()
    if args.tokenizer is None:
        from lit_svd.models import EMBEDDED_MODEL

        args.tokenizer = EMBEDDED_MODEL
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.heads = 2, 64, 176, 4
        # GSM8K prompts are ~60 tokens: 256 leaves response tokens for EVA (it reads labelled tokens only).
        args.rank, args.batches, args.batch, args.seq = 4, 2, 2, 256
        if args.out == RESULTS_DIR / "calibration.json":
            args.out = RESULTS_DIR / "calibration_smoke.json"
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    batches, vocab = gsm8k_batches(args)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    shapes = {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "rank", "batches", "batch")}
    results: dict[str, Any] = {
        "meta": environment(device) | {"shapes": shapes | {"vocab": vocab, "tokens": tokens}},
        "runs": [],
    }
    print(f"device: {results['meta']['device_name']}  {len(batches)} batches, {tokens} tokens", flush=True)
    for run in args.runs:
        try:
            results["runs"].append(measure(run, batches, vocab, args, device))
            print(f"{run}: {results['runs'][-1]['seconds']:.2f} s", flush=True)
        except Exception as err:  # one broken run must not lose the others' numbers
            results.setdefault("errors", {})[run] = repr(err)
            traceback.print_exc()
        write_json(args.out, results)
    seconds = {(r["impl"], r["method"]): r["seconds"] for r in results["runs"]}
    for row in results["runs"]:
        if row["impl"] == "ours" and ("peft", row["method"]) in seconds:
            row["speedup_vs_peft"] = seconds[("peft", row["method"])] / row["seconds"]
    write_json(args.out, results)
    columns = ["run", "seconds", "calibration_seconds", "pass_seconds", "finalize_seconds", "init_seconds", "passes"]
    columns += ["packed"]
    columns += ["statistics_gb", "peak_extra_gb"]
    print(format_table(results["runs"], [*columns, "speedup_vs_peft"]))


if __name__ == "__main__":
    main()
