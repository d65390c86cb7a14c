"""End-to-end training throughput of the GSM8K recipe on SmolLM2 vs a plain PyTorch + PEFT loop, in one run.

The anchor is the loop a user writes around PEFT without thinking about speed: random order, each batch
padded to its longest example, ``model(input_ids, attention_mask, labels=labels).loss`` (full logits,
upcast to float32), AdamW, cosine schedule with warmup, bf16 autocast, gradient clipping at 1.0. Ours is
the recipe: ``LitSVDAdapter`` + ``GSM8KDataModule`` through ``Trainer.fit`` (bf16-mixed), in three data
layouts so the table shows where the time goes:

    padded    random order, per-batch padding (what the anchor does; fused loss only)
    grouped   length-grouped batches (``group_by_length=True``)
    packed    length-grouped and padding-free (``pack_sequences=True``): one row per batch, attention per
              sequence through variable-length FlashAttention
    compiled  packed, with every decoder layer compiled (``LitSVDAdapter(compile=True)``)
    graphed   compiled with CUDA graphs (``compile_mode="reduce-overhead"``) over rows rounded up to a
              multiple of 1024 tokens (``pack_to_multiple_of=1024``), so a few row shapes are replayed
    cudagraphs  the same rows, layers captured in CUDA graphs by dynamo's ``"cudagraphs"`` backend: no
              inductor code generation (no compile time beyond tracing), one graph per layer and row shape
    layergraphs  packed rows rounded up to a multiple of 4096 tokens, every decoder layer's forward and
              backward replayed as CUDA graphs captured by ``torch.cuda.make_graphed_callables``
              (``LitSVDAdapter(cuda_graph_layers=True)``): nothing compiled, one capture per row shape
    layergraphs2k  the same with rows rounded up to a multiple of 2048 tokens (less padding, more shapes)
    layergraphs2k-liger  layergraphs2k with ``liger_kernels=True`` (Liger's kernels inside the captured layers,
              its fused linear cross-entropy as the loss head)
    packed2k  packed rows rounded up to a multiple of 2048 tokens, eager layers: the 7B overlay's layout
              until it moved to 256-token rounding (``recipes/configs/overlays/fast_7b.yaml``)
    packed2k-gc  the same with gradient checkpointing (``LitSVDAdapter(gradient_checkpointing=True)``)
    packed2k-liger  packed2k with ``LitSVDAdapter(liger_kernels=True)``: Liger's RMSNorm, SwiGLU and RoPE
              kernels in the model and its fused linear cross-entropy as the loss head (Triton, GPUs only;
              the RoPE patch is global to transformers' Llama module, so run it after the others)
    packed2k-gc-liger  both
    budget-liger  TRL's step shape: batches filled up to TRL's rows × ``--max-length`` tokens
              (``max_tokens_per_batch``), rows rounded up to a multiple of ``--max-length``; Liger's kernels
    budget-gc-liger  the same with gradient checkpointing
    layergraphs-budget  graphed layers on TRL's step shape: batches filled up to TRL's rows × ``--max-length``
              tokens, every row padded to exactly that budget. One row length, but the number of sequences
              in a row still varies and each count is a capture: 16 in a SmolLM2 epoch, the slowest layout
              measured (docs/performance.md, section 5)

A second anchor is what users pick instead of writing a loop: TRL's ``SFTTrainer`` with PEFT LoRA and its
fastest documented settings, in the same process, on the same tokenised examples (prompt tokens masked):

    trl:packed            packing (best-fit decreasing) with ``padding_free=True``, bf16, no gradient checkpointing
    trl:packed-liger      the same with Liger kernels (``use_liger_kernel=True``: fused linear cross-entropy,
                          RMSNorm, RoPE, SwiGLU; Triton, so GPUs only)
    trl:packed-gc         packing with gradient checkpointing (TRL's default is on)
    trl:packed-liger-gc   both

TRL packs rows of ``--max-length`` tokens; its per-device batch is the number of such rows that holds as many
tokens as ours (``--batch-size`` examples of the mean length), so a step covers the same tokens and the
learning-rate schedule (cosine, 3 % warm-up, ``--lr``, clipping at 1.0) the same span of data.

Every run: SmolLM2-135M-Instruct (bf16 weights on GPUs; float32 on CPUs, for ``--smoke``), r=16 on all 7
projections, batch 32, one epoch of GSM8K train (or ``--max-steps``), the same tokenised examples.
Throughput = non-padding tokens ÷ seconds of the training loop (first batch to last optimizer step, device
synchronised; ``steady_tokens_per_s`` leaves out the first 20 steps, where compilation happens); ``fit_s`` is
the whole ``Trainer.fit`` (SVD initialisation and data loading included). ``--profile`` adds a ``torch.profiler``
table of the top CUDA kernels over 10 steps of each run.

Usage:
    PYTHONPATH=. python bench/recipe.py --data-dir ../shared/data/gsm8k --model SmolLM2.gguf
    PYTHONPATH=. python bench/recipe.py --data-dir ../shared/data/gsm8k --smoke      # 2 steps, CPU ok
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from _common import RESULTS_DIR, device_profiler, environment, format_table, gb, synchronize, write_json
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from lit_svd import AdapterConfig
from lit_svd.callbacks import SVDInit
from lit_svd.data import GSM8KDataModule, InstructionCollator, non_padding_tokens
from lit_svd.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer
from lit_svd.module import LitSVDAdapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Layout(NamedTuple):
    group_by_length: bool
    pack_sequences: bool
    compile_backend: str | None = None
    pack_to_multiple_of: int | None = None
    compile_mode: str | None = None
    cuda_graph_layers: bool = False
    gradient_checkpointing: bool = False
    liger: bool = False
    token_budget: bool = False


LAYOUTS = {
    "padded": Layout(False, False),
    "grouped": Layout(True, False),
    "packed": Layout(True, True),
    "compiled": Layout(True, True, "inductor"),
    "graphed": Layout(True, True, "inductor", 1024, "reduce-overhead"),
    "cudagraphs": Layout(True, True, "cudagraphs", 1024),
    "layergraphs": Layout(True, True, pack_to_multiple_of=4096, cuda_graph_layers=True),
    "layergraphs2k": Layout(True, True, pack_to_multiple_of=2048, cuda_graph_layers=True),
    "layergraphs2k-liger": Layout(True, True, pack_to_multiple_of=2048, cuda_graph_layers=True, liger=True),
    "packed2k": Layout(True, True, pack_to_multiple_of=2048),
    "packed2k-gc": Layout(True, True, pack_to_multiple_of=2048, gradient_checkpointing=True),
    "packed2k-liger": Layout(True, True, pack_to_multiple_of=2048, liger=True),
    "packed2k-gc-liger": Layout(True, True, pack_to_multiple_of=2048, gradient_checkpointing=True, liger=True),
    "budget-liger": Layout(True, True, liger=True, token_budget=True),
    "budget-gc-liger": Layout(True, True, gradient_checkpointing=True, liger=True, token_budget=True),
    "layergraphs-budget": Layout(True, True, cuda_graph_layers=True, token_budget=True),
}
STEADY_FROM = 20
"""Steps before this one (compilation, allocator warm-up) are left out of the steady-state rate."""


class LoopClock(L.Callback):
    """Training-loop seconds (first batch start → train end, synchronised) and non-padding tokens seen."""

    def __init__(self, profile_steps: tuple[int, int] | None = None) -> None:
        self.start: float | None = None
        self.seconds = float("nan")
        self.tokens: torch.Tensor | int = 0
        self.steady_start: float | None = None
        self.steady_tokens: torch.Tensor | int = 0
        self.profile_steps = profile_steps
        self.profiler: torch.profiler.profile | None = None
        self.layer_graph_captures: int | None = None
        self.layer_graph_capture_s: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None:
            synchronize(pl_module.device)
            self.start = time.perf_counter()
        if batch_idx == STEADY_FROM:
            synchronize(pl_module.device)
            self.steady_start = time.perf_counter()
        if self.profile_steps and batch_idx == self.profile_steps[0]:
            self.profiler = device_profiler(pl_module.device)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens = self.tokens + non_padding_tokens(batch)
        if self.steady_start is not None:
            self.steady_tokens = self.steady_tokens + non_padding_tokens(batch)
        if self.profiler is not None and batch_idx == self.profile_steps[1]:
            synchronize(pl_module.device)
            self.profiler.__exit__(None, None, None)

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        end = time.perf_counter()
        self.seconds = end - self.start
        self.steady_seconds = end - self.steady_start if self.steady_start is not None else float("nan")
        graphs = getattr(pl_module, "_layer_graphs", None)  # before the module's own on_train_end drops them
        self.layer_graph_captures = graphs.captures if graphs is not None else None
        self.layer_graph_capture_s = round(graphs.capture_seconds, 2) if graphs is not None else None


def profile_table(profiler: torch.profiler.profile | None, rows: int = 15) -> str | None:
    """Top kernels by device time (CPU time without a GPU) of a finished profile."""
    if profiler is None:
        return None
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    averages = profiler.key_averages()
    # By device time (what the GPU does) and by CPU time (what the Python/dispatch side costs).
    tables = [averages.table(sort_by=key, row_limit=rows)]
    if key != "cpu_time_total":
        tables.append(averages.table(sort_by="cpu_time_total", row_limit=rows))
    return "\n".join(tables)


def peft_loop(args: argparse.Namespace, base_model, train_dataset, pad_token_id: int, device) -> dict[str, Any]:
    """The anchor: plain PyTorch + PEFT LoRA, random order, per-batch padding, HF's own loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(args.seed)
    model = get_peft_model(
        copy.deepcopy(base_model),
        LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=TARGETS),
    ).to(device)
    model.train()
    loader = DataLoader(
        train_dataset,
        args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=InstructionCollator(pad_token_id, args.max_length),
    )
    steps = len(loader) if args.max_steps is None else min(args.max_steps, len(loader))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.03 * steps), steps)
    profiler = None
    tokens: torch.Tensor | int = 0
    steady_tokens: torch.Tensor | int = 0
    steady_start = None
    synchronize(device)
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if step == steps:
            break
        if step == STEADY_FROM:
            synchronize(device)
            steady_start = time.perf_counter()
        if args.profile and step == args.profile_steps[0]:
            profiler = device_profiler(device)
            profiler.__enter__()
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = tokens + non_padding_tokens(batch)
        if steady_start is not None:
            steady_tokens = steady_tokens + non_padding_tokens(batch)
        if profiler is not None and step == args.profile_steps[1]:
            synchronize(device)
            profiler.__exit__(None, None, None)
    synchronize(device)
    end = time.perf_counter()
    seconds = end - start
    tokens = int(tokens)
    result = {
        "run": "peft-loop",
        "layout": "padded",
        "steps": steps,
        "tokens": tokens,
        "loop_s": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "steady_tokens_per_s": round(int(steady_tokens) / (end - steady_start)) if steady_start else None,
        "final_loss": round(loss.item(), 4),
        "profile": profile_table(profiler),
    }
    del model, optimizer
    return result


def trl_rows(args: argparse.Namespace, lengths: list[int]) -> int:
    """TRL's per-device batch: rows of ``--max-length`` tokens holding as many tokens as ``--batch-size`` examples."""
    return max(1, round(args.batch_size * (sum(lengths) / len(lengths)) / args.max_length))


def ours_fit(
    args: argparse.Namespace, method: str, layout: str, base_model, tokenizer, device, rows: int
) -> dict[str, Any]:
    """The recipe through ``Trainer.fit`` with one data layout."""
    (
        group_by_length,
        pack,
        compile_backend,
        multiple,
        compile_mode,
        cuda_graph_layers,
        checkpointing,
        liger,
        budget,
    ) = LAYOUTS[layout]
    budget_tokens = None
    if budget:  # TRL's tokens per step (trl_sft's rows of --max-length), in rows rounded up to --max-length
        budget_tokens, multiple = rows * args.max_length, args.max_length
        if cuda_graph_layers:  # every row the budget's length (the sequence count per row still varies)
            multiple = budget_tokens
    compile_layers = compile_backend is not None
    captures_cuda_graphs = compile_mode == "reduce-overhead" or compile_backend == "cudagraphs"
    L.seed_everything(args.seed, verbose=False)
    data = GSM8KDataModule(
        data_dir=args.data_dir,
        max_length=args.max_length,
        batch_size=args.batch_size,
        group_by_length=group_by_length,
        pack_sequences=pack,
        pack_to_multiple_of=multiple,
        max_tokens_per_batch=budget_tokens,
        seed=args.seed,
        cache_dir=args.cache_dir,
        max_train_examples=args.max_train_examples,
    )
    adapter = AdapterConfig(method=method, rank=args.rank, target_modules=TARGETS, adapter_dtype="float32")
    module = LitSVDAdapter(
        copy.deepcopy(base_model),
        adapter,
        learning_rate=args.lr,
        warmup_ratio=0.03,
        compile=compile_layers,
        compile_backend=compile_backend or "inductor",
        compile_mode=compile_mode,
        cuda_graph_layers=cuda_graph_layers,
        gradient_checkpointing=checkpointing,
        liger_kernels=liger,
    )
    module.tokenizer = tokenizer
    clock = LoopClock(args.profile_steps if args.profile else None)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_epochs=1,
        max_steps=args.max_steps if args.max_steps is not None else -1,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        enable_checkpointing=False,
        logger=False,
        callbacks=[SVDInit(), clock],
        profiler=args.trainer_profiler,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    counters.clear()
    synchronize(device)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    synchronize(device)
    fit_seconds = time.perf_counter() - start
    tokens = int(clock.tokens)
    result = {
        "run": f"ours:{method}",
        "layout": layout,
        "steps": trainer.global_step,
        "tokens": tokens,
        "loop_s": round(clock.seconds, 2),
        "fit_s": round(fit_seconds, 2),
        "tokens_per_s": round(tokens / clock.seconds),
        "steady_tokens_per_s": round(int(clock.steady_tokens) / clock.steady_seconds)
        if clock.steady_start is not None
        else None,
        "final_loss": round(float(trainer.callback_metrics.get("train/loss", float("nan"))), 4),
        "profile": profile_table(clock.profiler),
        # More than a couple of graphs would mean recompilation (e.g. per sequence length).
        "compiled_graphs": counters["stats"]["unique_graphs"] if compile_layers else None,
        "graph_breaks": sum(counters["graph_break"].values()) if compile_layers else None,
        # Graphs that inductor ran without CUDA graphs (reasons in the log with TORCH_LOGS=perf_hints).
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"] if captures_cuda_graphs else None,
        "layer_graph_captures": clock.layer_graph_captures,
        "layer_graph_capture_s": clock.layer_graph_capture_s,
    }
    del module, trainer
    return result


TRL_VARIANTS = ("packed", "packed-liger", "packed-gc", "packed-liger-gc")


def trl_sft(
    args: argparse.Namespace, variant: str, base_model, tokenizer, train_dataset, device, rows: int
) -> dict[str, Any]:
    """The second anchor: TRL ``SFTTrainer`` + PEFT LoRA on the recipe's tokenised examples (see the module doc),
    ``rows`` packed rows of ``--max-length`` per step (:func:`trl_rows`)."""
    import inspect
    import tempfile

    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    def labelled(example: dict) -> dict:
        prompt = example["prompt_length"]
        return {"labels": [-100] * prompt + example["input_ids"][prompt:]}  # loss on the response only

    dataset = train_dataset.map(labelled, remove_columns=["prompt_length"])

    class Clock(TrainerCallback):  # the loop's own time, and the steady part after STEADY_FROM steps
        def __init__(self) -> None:
            self.start = self.steady_start = self.end = None
            self.steady_tokens_from = 0
            self.trainer = None  # set once built: its running count of trained tokens

        def on_train_begin(self, *_, **__):
            synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, _args, state, *_, **__):
            if state.global_step == STEADY_FROM:
                synchronize(device)
                self.steady_start, self.steady_tokens_from = time.perf_counter(), self.trainer._total_train_tokens

        def on_train_end(self, *_, **__):
            synchronize(device)
            self.end = time.perf_counter()

    clock = Clock()
    # transformers 5 folds warmup_ratio into warmup_steps (a float below 1 is a ratio); older ones have both.
    fields = inspect.signature(SFTConfig).parameters
    warmup = {"warmup_ratio": 0.03} if "warmup_ratio" in fields else {"warmup_steps": 0.03}
    with tempfile.TemporaryDirectory() as output_dir:
        config = SFTConfig(
            output_dir=output_dir,
            per_device_train_batch_size=rows,
            max_length=args.max_length,
            packing=True,
            padding_free=True,
            use_liger_kernel="liger" in variant,
            gradient_checkpointing=variant.endswith("-gc"),
            bf16=device.type == "cuda",
            use_cpu=device.type == "cpu",
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            **warmup,
            max_grad_norm=1.0,
            num_train_epochs=1,
            max_steps=args.max_steps if args.max_steps is not None else -1,
            seed=args.seed,
            logging_steps=50,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = SFTTrainer(
            model=copy.deepcopy(base_model),
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=TARGETS),
            callbacks=[clock],
        )
        clock.trainer = trainer
        output = trainer.train()
    tokens = int(trainer._total_train_tokens)
    seconds = clock.end - clock.start
    result = {
        "run": f"trl:{variant}",
        "layout": f"packed rows of {args.max_length}, {rows} per step",
        "steps": output.global_step,
        "tokens": tokens,
        "loop_s": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "steady_tokens_per_s": round((tokens - clock.steady_tokens_from) / (clock.end - clock.steady_start))
        if clock.steady_start is not None
        else None,
        "final_loss": round(float(output.training_loss), 4),
        "profile": None,
    }
    del trainer
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder with GSM8K train/test JSON(L)")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="Hub id, local dir or .gguf (default: embedded)")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=[
            "peft-loop",
            "ours:lora:compiled",
            "ours:sorsa:compiled",
            "ours:lora:packed",
            "ours:lora:grouped",
            "ours:lora:padded",
        ],
        help=f"peft-loop, ours:<method>:<{'|'.join(LAYOUTS)}> and/or trl:<{'|'.join(TRL_VARIANTS)}>",
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: 1 epoch)")
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--cache-dir", default=None, help="datasets cache folder")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of 10 steps per run")
    parser.add_argument(
        "--trainer-profiler", default=None, help="Lightning profiler for ours:* runs (e.g. simple: seconds per hook)"
    )
    parser.add_argument("--smoke", action="store_true", help="2 steps on 64 examples (CPU ok); no results file")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "recipe.json")
    args = parser.parse_args(argv)
    for run in args.runs:
        parts = run.split(":")
        ours = len(parts) == 3 and parts[0] == "ours" and parts[2] in LAYOUTS
        trl = len(parts) == 2 and parts[0] == "trl" and parts[1] in TRL_VARIANTS
        if run != "peft-loop" and not (ours or trl):
            parser.error(
                f"unknown run {run!r}: use peft-loop, ours:<method>:<{'|'.join(LAYOUTS)}> "
                f"or trl:<{'|'.join(TRL_VARIANTS)}>"
            )
    if args.smoke:
        args.max_steps, args.max_train_examples, args.batch_size = 2, 64, 2
    args.profile_steps = (20, 29) if args.max_steps is None or args.max_steps > 30 else (0, 1)
    return args


def _payload(args: argparse.Namespace, device: torch.device, results: list[dict], finished: bool) -> dict[str, Any]:
    settings = vars(args) | {"out": str(args.out)}
    return {"environment": environment(device), "settings": settings, "finished": finished, "results": results}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.model)
    # bf16 on GPUs (what is measured); float32 on CPUs, where bf16 matrix products can be ~30x slower than
    # float32 (CPUs without native bf16, e.g. AVX2-only), so that --smoke tests the plumbing in seconds.
    base_model = load_causal_lm(args.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    # The anchor gets exactly the examples the recipe trains on (same tokenisation and length policy).
    data = GSM8KDataModule(
        data_dir=args.data_dir,
        max_length=args.max_length,
        cache_dir=args.cache_dir,
        max_train_examples=args.max_train_examples,
    )
    data.set_tokenizer(tokenizer)
    data.setup("fit")
    train_dataset = data.train_dataset.select_columns(["input_ids", "prompt_length"])
    # TRL's rows per step, which also size ours' token-budget layouts: read from the examples once.
    rows = trl_rows(args, [len(ids) for ids in train_dataset["input_ids"]])
    results = []
    for run in args.runs:
        try:
            if run == "peft-loop":
                result = peft_loop(args, base_model, train_dataset, data.pad_token_id, device)
            elif run.startswith("trl:"):
                result = trl_sft(args, run.split(":")[1], base_model, tokenizer, train_dataset, device, rows)
            else:
                _, method, layout = run.split(":")
                result = ours_fit(args, method, layout, base_model, tokenizer, device, rows)
        except Exception as error:  # one broken layout must not cost the other runs of a (scarce) GPU call
            traceback.print_exc()
            message = f"{type(error).__name__}: {error}"[:500]
            result = {"run": run, "error": message, "tokens_per_s": None, "steps": None, "profile": None}
        if device.type == "cuda":
            result["peak_gb"] = gb(torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)
        results.append(result)
        if result.get("error"):
            print(f"{run}: failed: {result['error']}", flush=True)
        else:
            print(f"{run}: {result['tokens_per_s']} tokens/s over {result['steps']} steps", flush=True)
        if not args.smoke:  # a later run that crashes the process (or hits a time limit) keeps these
            write_json(args.out, _payload(args, device, results, finished=False))
        if result["profile"]:
            print(result["profile"], flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    anchor = next((r for r in results if r["run"] == "peft-loop"), None)
    for result in results:
        for key in ("tokens_per_s", "steady_tokens_per_s"):
            ratio = result[key] / anchor[key] if anchor and anchor.get(key) and result.get(key) else None
            result[f"x_{key}"] = round(ratio, 2) if ratio else None
    columns = [
        "run",
        "layout",
        "steps",
        "loop_s",
        "fit_s",
        "tokens_per_s",
        "x_tokens_per_s",
        "steady_tokens_per_s",
        "x_steady_tokens_per_s",
        "peak_gb",
        "compiled_graphs",
        "cudagraph_skips",
        "layer_graph_captures",
    ]
    print(format_table(results, columns))
    if not args.smoke:
        write_json(args.out, _payload(args, device, results, finished=True))
        print(f"wrote {args.out}")
    failed = [result["run"] for result in results if result.get("error")]
    if failed:
        raise SystemExit(f"failed runs: {', '.join(failed)}")


if __name__ == "__main__":
    main()
