"""Reproduction study: our LoRA/PiSSA/OLoRA/SORSA/OSoRA vs PEFT's LoRA/PiSSA/OLoRA on SmolLM2, GSM8K.

Every method is trained by the same Lightning loop (same data order, steps, LR schedule, precision);
PEFT's adapters enter through the ``inject`` hook of ``LitSVDAdapter``. For each (method, seed) the script
records trainable parameters, training wall time and tokens/s, the held-out GSM8K test loss
(teacher-forced on the reference solutions) and greedy GSM8K test accuracy, and writes one JSON line.

    python recipes/studies/gsm8k_methods.py --model embedded:SmolLM2-135M-Instruct \\
        --data-dir ../shared/data/gsm8k --methods sorsa,pissa,peft-pissa --seeds 0 --out runs/study

``--methods base`` evaluates the untrained model. See docs/reproduction.md for the full protocol.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_svd import AdapterConfig, merge_adapters, trainable_parameter_count
from lit_svd.callbacks import SpectralMonitor, SVDInit
from lit_svd.data import GSM8KDataModule
from lit_svd.eval import evaluate
from lit_svd.models import load_causal_lm, load_tokenizer
from lit_svd.module import LitSVDAdapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Learning rates at batch 32 for SmolLM2 (r=16); override with --lr method=value.
DEFAULT_LR = {"lora": 2e-4, "pissa": 1e-4, "olora": 1e-4, "sorsa": 1e-4, "osora": 2e-3}
PEFT_INIT = {"peft-lora": True, "peft-pissa": "pissa", "peft-olora": "olora"}


class PEFTAdapterModule(LitSVDAdapter):
    """The same LightningModule, with PEFT's LoRA variants injected instead of ours."""

    peft_init: bool | str = True

    def inject(self, model):
        import peft

        config = self.adapter_config()
        lora = peft.LoraConfig(
            r=config.rank,
            lora_alpha=config.rank,
            target_modules=config.target_modules,
            lora_dropout=0.0,
            init_lora_weights=self.peft_init,
        )
        return peft.get_peft_model(model, lora)


@torch.no_grad()
def test_loss(model, loader, device) -> float:
    """Mean token NLL of the reference solutions given the prompts (labels −100 on prompt/padding)."""
    total, count = 0.0, 0
    model.eval()
    for batch in loader:
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids, attention_mask=mask).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        total += nll.item()
        count += int((labels[:, 1:] != -100).sum())
    return total / count


def run_one(method: str, seed: int, args, base_model, tokenizer, out: Path) -> dict:
    L.seed_everything(seed)
    data = GSM8KDataModule(
        data_dir=args.data_dir,
        max_length=args.max_length,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        group_by_length=True,
        seed=seed,
        cache_dir=args.cache_dir,
        max_train_examples=args.max_train_examples,
        max_eval_examples=args.loss_questions,
    )
    data.set_tokenizer(tokenizer)
    data.setup("fit")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record: dict = {"method": method, "seed": seed}
    model = copy.deepcopy(base_model)
    if method != "base":
        name = method.removeprefix("peft-")
        lr = args.lr.get(method, args.lr.get(name, DEFAULT_LR[name]))
        adapter = AdapterConfig(method=name, rank=args.rank, target_modules=TARGETS, adapter_dtype="float32")
        cls = LitSVDAdapter
        if method in PEFT_INIT:
            cls = type("PEFT", (PEFTAdapterModule,), {"peft_init": PEFT_INIT[method]})
        module = cls(model, adapter, tokenizer=None, learning_rate=lr, scheduler="cosine", warmup_ratio=0.03)
        module.tokenizer = tokenizer
        trainer = L.Trainer(
            accelerator="auto",
            devices=1,
            precision=args.precision,
            max_epochs=1,
            max_steps=args.max_steps,
            gradient_clip_val=1.0,
            limit_val_batches=0,
            enable_checkpointing=False,
            log_every_n_steps=10,
            logger=TensorBoardLogger(out / "runs", name=method, version=f"seed{seed}"),
            callbacks=[SVDInit(), SpectralMonitor(every_n_steps=50)],
            enable_progress_bar=False,
        )
        tokens = sum(min(int(n), args.max_length) for n in data.train_dataset["length"])  # non-padding tokens
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        record.update(
            lr=lr,
            trainable_parameters=trainable_parameter_count(module.model),
            train_seconds=round(seconds, 1),
            steps=trainer.global_step,
            final_train_loss=float(trainer.callback_metrics.get("train/loss", math.nan)),
        )
        if tokens and trainer.global_step * args.batch_size >= len(data.train_dataset):
            record["tokens_per_second"] = round(tokens / seconds)
        model = module.model
        model = model.merge_and_unload() if method in PEFT_INIT else merge_adapters(model)
    model.to(device)
    record["test_loss"] = round(test_loss(model, data.eval_dataloader(args.eval_batch_size), device), 5)
    eval_data = GSM8KDataModule(
        data_dir=args.data_dir,
        max_length=args.max_length,
        eval_batch_size=args.eval_batch_size,
        max_eval_examples=args.eval_questions,
        cache_dir=args.cache_dir,
    )
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        start = time.perf_counter()
        scores = evaluate(model, tokenizer, eval_data, max_new_tokens=args.max_new_tokens, progress=False)
    record.update(
        accuracy=scores["accuracy"],
        eval_questions=scores["num_examples"],
        eval_seconds=round(time.perf_counter() - start, 1),
    )
    print(json.dumps(record), flush=True)
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--methods", default="base,lora,pissa,olora,sorsa,osora,peft-lora,peft-pissa,peft-olora")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lr", default="", help="comma list method=value overriding DEFAULT_LR")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--eval-questions", type=int, default=None, help="GSM8K test questions (default all 1319)")
    parser.add_argument("--loss-questions", type=int, default=None, help="test examples for the loss (default all)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="runs/study")
    args = parser.parse_args()
    args.lr = {k: float(v) for k, v in (item.split("=") for item in args.lr.split(",") if item)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    base_model = load_causal_lm(args.model, dtype=dtype)
    tokenizer = load_tokenizer(args.model)
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            run_one(method, seed, args, base_model, tokenizer, out)


if __name__ == "__main__":
    main()
