"""Seconds of one ``SpectralMonitor.measure`` per adapter method, on any device (CPU included).

The adapters sit on bare ``nn.Linear`` layers with Llama-2-7B shapes (7 projections per decoder layer:
q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008), bf16 base weights, float32 adapter tensors
of rank r. No SVD init is run (it would take minutes on a CPU): every adapter tensor and init snapshot
is filled with random values and the base weights with a constant, which costs the monitor exactly what
trained factors cost. The first ``measure`` (which also records each ``‖W_0‖_F``, once per run) is not
timed.

Usage (prints one line per method; median and minimum over the repeats):
    PYTHONPATH=. python bench/monitor.py
    PYTHONPATH=. python bench/monitor.py --layers 2 --methods lora sorsa --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import synchronize
from torch import nn

from lit_svd import AdapterConfig, adapter_layers, inject_adapters
from lit_svd.callbacks import SpectralMonitor

SHAPES = {  # (out_features, in_features) as multiples of (hidden, intermediate)
    "q_proj": ("h", "h"),
    "k_proj": ("h", "h"),
    "v_proj": ("h", "h"),
    "o_proj": ("h", "h"),
    "gate_proj": ("i", "h"),
    "up_proj": ("i", "h"),
    "down_proj": ("h", "i"),
}


def build(args: argparse.Namespace, method: str, device: torch.device) -> nn.Module:
    """``layers.<i>.<projection>`` linears with random bf16 weights and random adapter tensors."""
    size = {"h": args.hidden, "i": args.intermediate}
    generator = torch.Generator(device).manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(args.layers):
        block = nn.Module()
        for name, (out, inp) in SHAPES.items():
            linear = nn.Linear(size[inp], size[out], bias=False, device="meta")
            # A constant base weight: only the first, untimed measure reads it (drawing GBs of randoms is slow).
            weight = torch.full((size[out], size[inp]), 0.02, device=device, dtype=torch.bfloat16)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            setattr(block, name, linear)
        model.layers.append(block)
    config = AdapterConfig(method=method, rank=args.rank, target_modules=list(SHAPES), adapter_dtype="float32")
    inject_adapters(model, config, initialize=False)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for name in (*layer.trainable_names, *layer.frozen_names):
                tensor = getattr(layer, name)
                tensor.copy_(torch.randn(tensor.shape, device=device, generator=generator) / tensor.shape[-1] ** 0.5)
                if layer.decomposition is not None and name in layer.trainable_names:
                    snapshot = getattr(layer, f"init_{name}")
                    snapshot.copy_(tensor + 1e-3 * torch.randn(tensor.shape, device=device, generator=generator))
            layer.initialized.fill_(True)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=["lora", "pissa", "olora", "sorsa", "osora"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    print(f"{args.layers} layers × {len(SHAPES)} projections, r={args.rank}, {device}, {threads} threads")
    for method in args.methods:
        model = build(args, method, device)
        monitor = SpectralMonitor()
        monitor.measure(model)  # records ‖W_0‖_F once per run: not part of the recurring cost
        seconds = []
        for _ in range(args.repeats):
            synchronize(device)
            start = time.perf_counter()
            monitor.measure(model)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        print(f"{method:6s} measure: median {statistics.median(seconds):.3f} s, min {min(seconds):.3f} s", flush=True)
        del model


if __name__ == "__main__":
    main()
