"""Training throughput and peak memory per adapter, lit_svd vs PEFT LoRA, in one run on identical shapes.

Model: Llama-2-7B shapes truncated to 8 decoder layers (hidden 4096, intermediate 11008, 32 heads,
vocab 32000), random bf16 weights built on the device, SDPA attention, no gradient checkpointing on
either side. Adapters of rank 128 on all 7 projections; AdamW (fused) over the adapter parameters;
forward under bf16 autocast; random tokens, seq 1024, batch 8. Each run: build, init, a few warm-up
steps, then timed steps (wall clock between device synchronisations) and the peak of
``torch.cuda.max_memory_allocated`` over warm-up + timed steps.

Runs are named ``impl:method[-variant]``:
- ``peft:lora``: PEFT ``get_peft_model`` with its defaults (adapter weights upcast to float32,
  ``autocast_adapter_dtype=True``): the SPEC §7 anchor (27.8k tokens/s, 26.4 GB on an H100).
- ``peft:lora-bf16``: PEFT with ``autocast_adapter_dtype=False`` (bf16 adapter weights).
- ``peft:dora`` / ``peft:vera``: PEFT's DoRA (``LoraConfig(use_dora=True)``) and VeRA (``VeraConfig``, r as
  ours), the baselines of ``ours:dora`` / ``ours:vera`` (column ``x_vs_peft_same``; issue 19's DoRA target:
  ≥ 1.10× PEFT's tokens/s at ≤ its peak memory).
- ``ours:<method>``: ``inject_adapters`` with ``adapter_dtype="float32"`` (same trainable precision as
  PEFT's default); ``ours:<method>-bf16`` keeps the adapters in bf16 (lit_svd's default dtype).
  SORSA adds ``(γ/lr)·orthonormal_regularizer(model)`` each step (γ = 4e-4), back-propagated after the
  task loss as the reference implementation does.

Each ``ours:`` run also times one ``SpectralMonitor.measure`` (+ heat-map figure) on the trained model:
its share of training time at the default interval of 50 steps.

Usage (results to bench/results/train.json, printed as tables):
    PYTHONPATH=. python bench/train.py
    PYTHONPATH=. python bench/train.py --runs peft:lora ours:sorsa --profile peft:lora ours:sorsa
    PYTHONPATH=. python bench/train.py --smoke      # tiny model on any device, seconds
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from _common import (
    RESULTS_DIR,
    Timer,
    device_profiler,
    environment,
    format_table,
    random_llama,
    synchronize,
    time_steps,
    write_json,
)
from torch import nn
from transformers import LlamaForCausalLM

from lit_svd import AdapterConfig, adapter_layers, inject_adapters, orthonormal_regularizer

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_RUNS = [
    "peft:lora",
    "peft:lora-bf16",
    "ours:lora",
    "ours:pissa",
    "ours:olora",
    "ours:sorsa",
    "ours:osora",
    "ours:lora-bf16",
    "peft:dora",
    "ours:dora",
    "peft:vera",
    "ours:vera",
]
GAMMA = 4e-4  # SORSA's default γ (SPEC §3)
LR = 1e-4


# ----- model ----------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, device: torch.device) -> LlamaForCausalLM:
    """A randomly initialised bf16 Llama built directly on ``device`` (no float32 copy, no meta tensors)."""
    return random_llama(
        layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, vocab=args.vocab,
        device=device, max_positions=max(args.seq, 4096),
    )  # fmt: skip


def prepare(run: str, args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model for ``run`` and put its adapters in; returns the model and a description."""
    impl, _, rest = run.partition(":")
    method, _, variant = rest.partition("-")
    model = build_model(args, device)
    info: dict[str, Any] = {"run": run, "impl": impl, "method": method, "variant": variant or "default"}
    start = time.perf_counter()
    if impl == "peft":
        import peft

        if method not in ("lora", "dora", "vera"):
            raise ValueError(f"PEFT runs here are LoRA, DoRA or VeRA, got {run!r}")
        if method == "vera":
            config = peft.VeraConfig(r=args.rank, target_modules=MODULES, task_type="CAUSAL_LM")
        else:
            config = peft.LoraConfig(
                r=args.rank,
                lora_alpha=args.rank,
                lora_dropout=0.0,
                target_modules=MODULES,
                use_dora=method == "dora",
                task_type="CAUSAL_LM",
            )
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=variant != "bf16")
    elif impl == "ours":
        adapter_dtype = "bfloat16" if variant == "bf16" else "float32"
        config = AdapterConfig(method=method, rank=args.rank, target_modules=MODULES, adapter_dtype=adapter_dtype)
        inject_adapters(model, config, initialize=True)
    else:
        raise ValueError(f"unknown run {run!r}: use peft:lora[-bf16] or ours:<method>[-bf16]")
    synchronize(device)
    info["init_seconds"] = time.perf_counter() - start
    trainable = [p for p in model.parameters() if p.requires_grad]
    info["trainable_params"] = sum(p.numel() for p in trainable)
    info["adapter_param_dtype"] = str(trainable[0].dtype).removeprefix("torch.")
    return model, info


# ----- training -------------------------------------------------------------------------------------------------
def make_step(model: nn.Module, run: str, args: argparse.Namespace, device: torch.device):
    """One optimizer step as a closure over the model, optimizer and a fixed token generator."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda")
    regularize = run.split(":")[1].startswith("sorsa")
    generator = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> None:
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device, generator=generator)
        with autocast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if regularize:
            # SORSA: the regulariser's own gradient after the task gradient, scaled by γ/η (SPEC §3).
            ((GAMMA / LR) * orthonormal_regularizer(model)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def kernel_profile(step, device: torch.device, steps: int = 2, top: int = 15) -> dict[str, Any]:
    """Top kernels by self device time over ``steps`` steps, plus time per kernel category."""
    with device_profiler(device) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if device.type == "cuda":  # keep device kernels: they have no CPU time of their own
        events = [e for e in events if getattr(e, "self_cpu_time_total", 0) == 0]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total_us = sum(getattr(e, attr) for e in events)
    categories: dict[str, float] = defaultdict(float)
    for e in events:
        categories[kernel_category(e.key)] += getattr(e, attr)
    return {
        "steps": steps,
        "device_ms_per_step": total_us / 1e3 / steps,
        "categories_ms_per_step": {k: round(v / 1e3 / steps, 2) for k, v in sorted(categories.items())},
        "top_kernels": [
            {
                "kernel": e.key[:120],
                "ms_per_step": round(getattr(e, attr) / 1e3 / steps, 3),
                "calls_per_step": e.count // steps,
                "share": round(getattr(e, attr) / total_us, 4),
            }
            for e in events[:top]
        ],
    }


def kernel_category(name: str) -> str:
    """Coarse kernel class from its name: GEMM, attention, optimizer, or memory-bound elementwise/other."""
    low = name.lower()
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "addmm", "matmul", "::mm")):
        return "gemm"
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if "adam" in low or "multi_tensor" in low:
        return "optimizer"
    if "reduce" in low or "norm" in low or "softmax" in low or "nll" in low:
        return "reduction"
    return "elementwise/copy"


def monitor_cost(model: nn.Module, device: torch.device, step_seconds: float) -> dict[str, Any]:
    """Seconds of one SpectralMonitor measurement and of one image write (heat-map + histogram rendered into a
    TensorBoard event file), and their share of training time at the default intervals: measurements every
    ``every_n_steps`` optimizer steps, images every ``images_every_n_steps``."""
    import tempfile

    from torch.utils.tensorboard import SummaryWriter

    from lit_svd.callbacks import SpectralMonitor
    from lit_svd.callbacks.spectral_monitor import write_images

    monitor = SpectralMonitor()
    monitor.measure(model)  # first call also records each original weight norm, once per run
    with Timer(device) as measured:
        spectra = monitor.measure(model)
    with tempfile.TemporaryDirectory() as folder, SummaryWriter(folder) as writer:
        with Timer(device) as imaged:
            write_images(writer, spectra)
    overhead = measured.seconds / (monitor.every_n_steps * step_seconds)
    overhead += imaged.seconds / (monitor.images_every_n_steps * step_seconds)
    return {
        "monitor_seconds": measured.seconds,
        "monitor_image_seconds": imaged.seconds,
        "monitor_every_n_steps": monitor.every_n_steps,
        "monitor_images_every_n_steps": monitor.images_every_n_steps,
        "monitor_overhead": overhead,
    }


def measure(run: str, args: argparse.Namespace, device: torch.device, profile_it: bool) -> dict[str, Any]:
    model, info = prepare(run, args, device)
    model.train()
    step = make_step(model, run, args, device)
    info |= time_steps(step, device, args.warmup, args.steps, args.batch * args.seq)
    if profile_it:
        info["profile"] = kernel_profile(step, device)
    if run.startswith("ours:"):
        info["adapted_layers"] = sum(1 for _ in adapter_layers(model))
        info |= monitor_cost(model, device, info["step_ms"] / 1e3)
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return info


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps: checks the script in seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="impl:method[-variant], see the module docstring")
    p.add_argument("--profile", nargs="*", default=["peft:lora", "ours:lora", "ours:osora"], help="runs to profile")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "train.json")
    args = p.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.heads, args.vocab = 2, 64, 176, 4, 128
        args.seq, args.batch, args.rank, args.warmup, args.steps = 32, 2, 8, 1, 2
        if args.out == RESULTS_DIR / "train.json":
            args.out = RESULTS_DIR / "train_smoke.json"
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default; both sides run under bf16 autocast
    results: dict[str, Any] = {
        "meta": environment(device)
        | {
            "shapes": {
                k: getattr(args, k)
                for k in ("layers", "hidden", "intermediate", "heads", "vocab", "seq", "batch", "rank")
            },
            "setup": (
                "bf16 weights, torch.autocast(bfloat16), SDPA attention, no gradient checkpointing, fused AdamW "
                f"lr={LR} over adapter params, {args.warmup} warm-up + {args.steps} timed steps, random tokens"
            ),
        },
        "runs": [],
    }
    print(f"device: {results['meta']['device_name']}  torch {torch.__version__}", flush=True)
    for run in args.runs:
        try:
            info = measure(run, args, device, run in args.profile)
        except Exception as err:  # one broken run must not lose the others' numbers
            results.setdefault("errors", {})[run] = repr(err)
            write_json(args.out, results)
            print(f"{run}: FAILED {err!r}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results["runs"].append(info)
        write_json(args.out, results)
        print(
            f"{run}: {info['tokens_per_s']:.0f} tokens/s, step {info['step_ms']:.1f} ms, "
            f"peak {info.get('peak_memory_gb', '-')} GB, init {info['init_seconds']:.1f} s",
            flush=True,
        )

    anchor = next((r for r in results["runs"] if r["run"] == "peft:lora"), None)
    for row in results["runs"]:
        if anchor:
            row["x_vs_peft_lora"] = row["tokens_per_s"] / anchor["tokens_per_s"]
            if "peak_memory_gb" in row:
                row["peak_le_peft_lora"] = row["peak_memory_gb"] <= anchor["peak_memory_gb"]
    by_run = {r["run"]: r for r in results["runs"]}
    for row in results["runs"]:  # ours against PEFT's implementation of the same method, same run
        same = by_run.get(f"peft:{row['method']}") if row["impl"] == "ours" and row["variant"] == "default" else None
        if same:
            row["x_vs_peft_same"] = row["tokens_per_s"] / same["tokens_per_s"]
            if "peak_memory_gb" in row:
                row["peak_le_peft_same"] = row["peak_memory_gb"] <= same["peak_memory_gb"]
    if "x_vs_peft_same" in by_run.get("ours:dora", {}):
        dora = by_run["ours:dora"]
        results["dora_target"] = {
            "ge_1.10x_peft_dora_tokens_per_s": dora["x_vs_peft_same"] >= 1.10,
            "peak_le_peft_dora": dora.get("peak_le_peft_same"),
        }
    if anchor:
        ours = [r for r in results["runs"] if r["impl"] == "ours" and r["variant"] == "default"]
        results["targets"] = {
            r["run"]: {
                "ge_1.10x_tokens_per_s": r["x_vs_peft_lora"] >= 1.10,
                "peak_le_peft_lora": r.get("peak_le_peft_lora"),
                "monitor_overhead_le_2pct": r.get("monitor_overhead", 1.0) <= 0.02,
            }
            for r in ours
        }
    write_json(args.out, results)

    print(f"\nTraining, {args.layers} layers, seq {args.seq}, batch {args.batch}, r={args.rank}:")
    print(
        format_table(
            results["runs"],
            [
                "run",
                "adapter_param_dtype",
                "trainable_params",
                "tokens_per_s",
                "x_vs_peft_lora",
                "x_vs_peft_same",
                "step_ms",
                "peak_memory_gb",
                "monitor_seconds",
                "monitor_image_seconds",
                "monitor_overhead",
            ],
            {
                "tokens_per_s": "{:.0f}".format,
                "x_vs_peft_lora": "{:.3f}".format,
                "x_vs_peft_same": "{:.3f}".format,
                "step_ms": "{:.1f}".format,
                "monitor_seconds": "{:.3f}".format,
                "monitor_image_seconds": "{:.3f}".format,
                "monitor_overhead": "{:.2%}".format,
            },
        )
    )
    for row in results["runs"]:
        if "profile" in row:
            prof = row["profile"]
            print(f"\nProfile {row['run']}: {prof['device_ms_per_step']:.1f} ms device time/step; by category:")
            print("  " + ", ".join(f"{k} {v:.1f} ms" for k, v in prof["categories_ms_per_step"].items()))
            print(format_table(prof["top_kernels"], ["kernel", "ms_per_step", "calls_per_step", "share"]))
    if "targets" in results:
        print("\nTargets:", results["targets"])
    if "dora_target" in results:
        print("DoRA vs PEFT's DoRA:", results["dora_target"])
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
