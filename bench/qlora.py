"""4-bit base training on one GPU: lit_svd (SORSA / LoRA with an NF4 base) vs PEFT QLoRA, in one run.

Issue 18's measurement. Model: Llama-2-7B shapes (32 decoder layers, hidden 4096, intermediate 11008, 32
heads, vocab 32000), random bf16 weights written once to a local checkpoint so both sides load the same
weights. Adapters of rank 64 on all 7 projections, gradient checkpointing (non-reentrant) on both sides,
batch 4 × 512 random tokens, bf16 autocast, fused AdamW over the adapter parameters.

- ``peft:qlora``: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16))``,
  ``prepare_model_for_kbit_training(use_gradient_checkpointing=True)``, ``get_peft_model(LoraConfig(r=64,
  lora_alpha=64))``; loss from the model (``labels=``), as a PEFT user writes it.
- ``ours:<method>[+liger][+compile]``: ``load_causal_lm`` in bf16 → ``LitSVDAdapter(..., AdapterConfig(method, rank=64,
  base_quantization="nf4"), gradient_checkpointing=True)`` → the whole model to the GPU → exact init there,
  then the residual quantized to NF4 (the bf16 weights are freed as each layer is quantized) → steps through
  ``LitSVDAdapter.compute_loss`` (the fused, chunked loss); SORSA adds the gradient of (γ/lr)·L_orth after
  the backward (``apply_regularizer_gradient``, as in a fit). ``+liger``:
  Liger's RMSNorm/SwiGLU/RoPE kernels and fused linear cross-entropy, as ``liger_kernels=True`` gives a fit.
  ``+compile``: every decoder layer compiled by inductor (the 4-bit dequantization traced into one graph per
  layer, checkpointed around the compiled call), as ``compile=True`` gives a fit; compilation happens in the
  warm-up steps. With ``+liger`` too, only Liger's loss head (inductor fuses the layers). Liger's layer kernels
  patch transformers process-wide, so ``+liger`` runs without ``+compile`` must come last.

Reported per run: tokens/s over the timed steps, the peak of ``torch.cuda.max_memory_allocated`` over
warm-up + timed steps (reset after init), the memory held before the first step and the init time. Targets
(issue 18): ours:sorsa peak ≤ 10 GB and ≤ PEFT's, tokens/s ≥ 1.2× PEFT QLoRA's.

Usage (results to bench/results/qlora.json):
    PYTHONPATH=. python bench/qlora.py                      # H200 / any CUDA GPU, a few minutes
    PYTHONPATH=. python bench/qlora.py --smoke              # tiny shapes on the CPU: proves the code path
Needs bitsandbytes and peft.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS_DIR, environment, random_llama, synchronize, time_steps, write_json

from lit_svd import AdapterConfig, LitSVDAdapter, initialize_adapters, load_causal_lm

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GAMMA, LR = 4e-4, 1e-4


def write_random_model(args: argparse.Namespace, folder: Path, device: torch.device) -> None:
    """A random Llama of the bench's shapes saved as a Hugging Face checkpoint in ``dtype`` (built on ``device``)."""
    model = random_llama(
        layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, vocab=args.vocab,
        device=device, dtype=args.dtype, max_positions=max(args.seq, 4096),
    )  # fmt: skip
    model.save_pretrained(folder)
    del model


def prepare(run: str, args: argparse.Namespace, folder: Path, device: torch.device):
    """The model of ``run`` on ``device`` with its adapters, and a ``loss(ids)`` closure."""
    impl, _, method = run.partition(":")
    method, *extras = method.split("+")
    if unknown := set(extras) - {"liger", "compile"}:
        raise ValueError(f"unknown option(s) {sorted(unknown)} in run {run!r}: +liger, +compile")
    checkpointing = {"use_reentrant": False}
    if impl == "peft":
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=args.dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization, dtype=args.dtype, device_map={"": device}
        )
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=checkpointing
        )
        config = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=MODULES, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config)

        def loss(ids: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids, labels=ids, use_cache=False).loss

        return model, loss, None
    if impl != "ours":
        raise ValueError(f"unknown run {run!r}: peft:qlora or ours:<method>")
    config = AdapterConfig(method=method, rank=args.rank, target_modules=MODULES, base_quantization="nf4", gamma=GAMMA)
    model = load_causal_lm(str(folder), dtype=args.dtype)
    module = LitSVDAdapter(model, config, gradient_checkpointing=True, compile="compile" in extras)
    module.model.to(device)
    initialize_adapters(module.model)  # exact init on the device, then NF4 of each residual; bf16 W freed
    if "liger" in extras:  # what LitSVDAdapter(liger_kernels=True) does in setup() of a fit on a GPU
        module.use_liger_kernels()
    if "compile" in extras:  # what LitSVDAdapter(compile=True) does when a fit starts; compiled in warm-up
        module.compile_decoder_layers()

    def loss(ids: torch.Tensor) -> torch.Tensor:
        return module.compute_loss({"input_ids": ids, "labels": ids})

    # SORSA's regulariser gradient, added after the backward as a fit adds it (zero work for other methods).
    return module.model, loss, module.apply_regularizer_gradient


def measure(run: str, args: argparse.Namespace, folder: Path, device: torch.device) -> dict[str, Any]:
    start = time.perf_counter()
    model, loss, after_backward = prepare(run, args, folder, device)
    synchronize(device)
    info: dict[str, Any] = {"run": run, "init_seconds": time.perf_counter() - start}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    info["trainable_params"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda")
    generator = torch.Generator(device).manual_seed(0)

    def step() -> None:
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device, generator=generator)
        with torch.autocast(device.type, dtype=args.dtype, enabled=args.dtype != torch.float32):
            value = loss(ids)
        value.backward()
        if after_backward is not None:
            after_backward(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch._dynamo.utils.counters.clear()
    info |= time_steps(step, device, args.warmup, args.steps, args.batch * args.seq)
    if "+compile" in run:  # one graph per layer and no graph break, or the layers did not run compiled
        info["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        info["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
    # free before the next run (the closure holds them)
    model = loss = after_backward = optimizer = params = step = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (float32), 2 steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", nargs="+", default=["peft:qlora", "ours:sorsa", "ours:lora"])
    for name, default in [("layers", 32), ("hidden", 4096), ("intermediate", 11008), ("heads", 32), ("vocab", 32000)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workdir", type=Path, default=None, help="where the random checkpoint goes (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    eager_liger = [i for i, run in enumerate(args.runs) if "+liger" in run and "+compile" not in run]
    if eager_liger and any("+compile" in run for run in args.runs[eager_liger[0] :]):
        p.error(
            "put +liger runs after the +compile ones: Liger patches transformers' modules process-wide, and a "
            "compiled layer cannot trace Liger's RMSNorm"
        )
    device = torch.device(args.device)
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPUs here lack fast bf16
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.heads, args.vocab = 2, 128, 256, 4, 128
        args.seq, args.batch, args.rank, args.warmup, args.steps = 32, 2, 8, 1, 2
    out = args.out or RESULTS_DIR / ("qlora_smoke.json" if args.smoke else "qlora.json")
    shapes = ("layers", "hidden", "intermediate", "heads", "vocab", "seq", "batch", "rank")
    results: dict[str, Any] = {
        "meta": environment(device) | {"shapes": {k: getattr(args, k) for k in shapes}, "dtype": str(args.dtype)},
        "runs": [],
    }
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp) / "random_llama"
        write_random_model(args, folder, device)
        for run in args.runs:
            try:
                info = measure(run, args, folder, device)
            except Exception as err:  # one failing run must not lose the others' numbers
                results.setdefault("errors", {})[run] = repr(err)
                print(f"{run}: FAILED {err!r}", flush=True)
                gc.collect()
                continue
            results["runs"].append(info)
            write_json(out, results)
            print(
                f"{run}: {info['tokens_per_s']:.0f} tokens/s, peak {info.get('peak_memory_gb', '-')} GB, "
                f"init {info['init_seconds']:.1f} s",
                flush=True,
            )
    peft_run = next((r for r in results["runs"] if r["run"] == "peft:qlora"), None)
    if peft_run:
        for row in results["runs"]:
            row["x_tokens_per_s_vs_peft_qlora"] = row["tokens_per_s"] / peft_run["tokens_per_s"]
            if "peak_memory_gb" in row:
                row["peak_le_peft_qlora"] = row["peak_memory_gb"] <= peft_run["peak_memory_gb"]
                row["peak_le_10_gb"] = row["peak_memory_gb"] <= 10
    write_json(out, results)


if __name__ == "__main__":
    main()
