"""Save a random-weight causal LM built from a config folder, for benchmarks where the weights don't matter.

Multi-GPU plumbing, speed and memory depend on shapes, not values, so a Llama-2-7B-shaped model can be built
on the GPU in seconds from a ``config.json`` (and the tokenizer saved next to it) instead of downloading
13 GB. The weights are drawn from the model's own initialiser under ``--seed``, so every run (and every
rank that loads the folder) sees the same model.

Usage:
    python bench/make_random_model.py --config .device/llama7b --out /tmp/llama7b [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="folder with config.json (+ tokenizer files)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.config / "config.json").is_file():
        raise SystemExit(f"no config.json in {args.config}")
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(args.config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    for file in args.config.iterdir():  # tokenizer files, chat template
        if file.is_file() and not (args.out / file.name).exists():
            shutil.copy(file, args.out / file.name)
    count = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - start
    print(f"saved {count / 1e9:.2f}B random parameters ({args.dtype}) to {args.out} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
