"""DoRA's per-row weight norm from low-rank terms vs forming the m×n weight, and one layer step vs PEFT's DoRA.

DoRA scales each output row by ``m_i / ‖W_i + s(BA)_i‖`` every step. Three ways to get the norm:

- ``low-rank`` (lit_svd, ``DoRALayer.direction_norm``): ``‖W_i‖² + 2s (W Aᵀ)_i·B_i + s² B_i (A Aᵀ) B_iᵀ`` with
  ``‖W_i‖²`` cached (W is frozen): one (m, n)×(n, r) GEMM and r×r work, no m×n temporary;
- ``formed``: ``vector_norm(W + s·B @ A, dim=1)``, the straightforward way (two m×n temporaries);
- ``peft``: PEFT 0.21's ``DoraLinearLayer`` way: ``B A`` through an n×n identity (``lora_B(lora_A(eye))``),
  then ``vector_norm(W + s·BA, dim=1)``.

Part 2 times a whole forward + backward of one adapted layer on ``tokens`` input rows: our ``DoRALayer``
against PEFT's ``lora.Linear`` with ``use_dora=True``, same weights; on CUDA also the peak memory.

Usage:
    PYTHONPATH=. python bench/dora_norm.py --threads 1                  # CPU, small shapes (a minute)
    PYTHONPATH=. python bench/dora_norm.py --device cuda --shapes 7b    # H100/H200: Llama-2-7B shapes, bf16
Results go to bench/results/dora_norm[_<device>].json and are printed with the ratios.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS_DIR, Timer, environment, format_table, gb, synchronize, write_json
from torch import nn

from lit_svd import AdapterConfig, adapter_layers, inject_adapters

SHAPES = {
    # (out, in): q/k/v/o, gate/up, down of Llama-2-7B, and the same at a quarter width for CPUs
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "small": [(1024, 1024), (2752, 1024), (1024, 2752)],
}


def dora_layer(m: int, n: int, rank: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A one-layer holder with our DoRA on it, B and the magnitude moved off their init (as in training)."""
    holder = nn.Module()
    holder.proj = nn.Linear(n, m, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        holder.proj.weight.normal_(0, 0.02)
    config = AdapterConfig(method="dora", rank=rank, alpha=2.0 * rank, target_modules=["proj"], adapter_dtype="float32")
    inject_adapters(holder, config)
    layer = next(adapter_layers(holder))[1]
    with torch.no_grad():
        layer.B.normal_(0, 0.01)
        layer.magnitude.mul_(1.1)
    return holder


def norm_ways(layer) -> dict[str, Any]:
    W, A, B, s = layer.weight_matrix(), layer.A, layer.B, layer.scaling

    def low_rank() -> torch.Tensor:
        return layer.direction_norm()

    def formed() -> torch.Tensor:
        with torch.no_grad():
            return torch.linalg.vector_norm(W + s * (B @ A).to(W.dtype), dim=1)

    def peft_way() -> torch.Tensor:
        with torch.no_grad():
            eye = torch.eye(A.shape[1], device=A.device, dtype=A.dtype)
            lora_weight = ((eye @ A.T) @ B.T).T  # lora_B(lora_A(x_eye)).T
            return torch.linalg.vector_norm(W + s * lora_weight.to(W.dtype), dim=1)

    return {"low-rank": low_rank, "formed": formed, "peft": peft_way}


def best_of(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (and fills our ‖W_i‖² cache, as after the first training step)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        best = min(best, t.seconds)
    return best


def peak_bytes(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def layer_step_rows(holder: nn.Module, rank: int, tokens: int, dtype, device, repeats: int) -> list[dict[str, Any]]:
    """Forward + backward of one layer on (tokens, n) inputs: ours vs PEFT's DoRA with the same tensors."""
    import peft

    layer = next(adapter_layers(holder))[1]
    base = nn.Module()
    base.proj = copy.deepcopy(layer.base_layer)
    config = peft.LoraConfig(r=rank, lora_alpha=2.0 * rank, target_modules=["proj"], use_dora=True)
    theirs = peft.get_peft_model(base, config).base_model.model.proj
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(layer.A)
        theirs.lora_B["default"].weight.copy_(layer.B)
        theirs.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    x = torch.randn(tokens, layer.in_features, device=device, dtype=dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step(module):
        def run() -> None:
            with autocast:
                out = module(x)
            out.float().square().mean().backward()

        return run

    with torch.no_grad(), autocast:
        diff = (layer(x).float() - theirs(x).float()).abs().max().item()
    rows = []
    for name, module in (("ours", layer), ("peft", theirs)):
        rows.append(
            {
                "impl": name,
                "shape": f"{layer.out_features}x{layer.in_features}",
                "rank": rank,
                "tokens": tokens,
                "step_ms": 1e3 * best_of(step(module), device, repeats),
                "peak_GB": gb(peak_bytes(step(module), device)) if device.type == "cuda" else None,
                "max_abs_diff_vs_other": diff,
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", choices=sorted(SHAPES), default=None, help="default: 7b on CUDA, small on CPU")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 128])
    p.add_argument("--tokens", type=int, default=None, help="rows of the layer-step input (default 8192 CUDA, 512 CPU)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 is steadier on a shared CPU)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = SHAPES[args.shapes or ("7b" if cuda else "small")]
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = args.tokens or (8192 if cuda else 512)
    repeats = args.repeats or (20 if cuda else 3)
    torch.backends.cuda.matmul.allow_tf32 = False
    meta = {"dtype": str(dtype), "tokens": tokens, "threads": torch.get_num_threads(), "repeats": repeats}
    results: dict[str, Any] = {"meta": environment(device) | meta, "norm": []}
    for r in args.ranks:
        for m, n in shapes:
            holder = dora_layer(m, n, r, dtype, device)
            layer = next(adapter_layers(holder))[1]
            ways = norm_ways(layer)
            reference = ways["formed"]().double()
            row: dict[str, Any] = {"shape": f"{m}x{n}", "rank": r}
            for name, fn in ways.items():
                row[f"{name}_ms"] = 1e3 * best_of(fn, device, repeats)
                row[f"{name}_peak_MB"] = (peak_bytes(fn, device) or 0) / 2**20 if cuda else None
                row[f"{name}_rel_err"] = ((fn().double() - reference).abs() / reference).max().item()
            row["formed/low-rank"] = row["formed_ms"] / row["low-rank_ms"]
            row["peft/low-rank"] = row["peft_ms"] / row["low-rank_ms"]
            results["norm"].append(row)
            print(
                f"{m}x{n} r={r}: low-rank {row['low-rank_ms']:.2f} ms, formed {row['formed_ms']:.2f} ms "
                f"({row['formed/low-rank']:.2f}x), PEFT's {row['peft_ms']:.2f} ms ({row['peft/low-rank']:.2f}x)",
                flush=True,
            )
            results.setdefault("layer_step", []).extend(layer_step_rows(holder, r, tokens, dtype, device, repeats))
            del holder
    cols = ["shape", "rank", "low-rank_ms", "formed_ms", "peft_ms", "formed/low-rank", "peft/low-rank"]
    fmt = {c: "{:.2f}".format for c in cols[2:]}
    print(f"\nPer-row norm of W + s·BA ({dtype}, best of {repeats}):")
    print(format_table(results["norm"], cols, fmt))
    if cuda:
        mem = ["shape", "rank", "low-rank_peak_MB", "formed_peak_MB", "peft_peak_MB"]
        print(format_table(results["norm"], mem, {c: "{:.0f}".format for c in mem[2:]}))
    print(f"\nOne layer, forward + backward on {tokens} tokens:")
    step_cols = ["impl", "shape", "rank", "step_ms", "peak_GB", "max_abs_diff_vs_other"]
    print(format_table(results["layer_step"], step_cols, {"step_ms": "{:.2f}".format}))
    out = args.out or RESULTS_DIR / f"dora_norm_{device.type}.json"
    write_json(out, results)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
