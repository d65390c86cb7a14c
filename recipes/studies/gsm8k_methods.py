"""Reproduction study on SmolLM2, GSM8K: every lit_svd method against PEFT's implementation of the same one.

Methods: ours ``lora pissa olora sorsa osora dora vera milora corda eva loraga loftq``, the 4-bit
``qlora qpissa qolora qsorsa qosora`` (NF4 base), and PEFT's ``peft-{lora,pissa,olora,dora,vera,mica,corda,
eva,loraga}`` (``mica`` is PEFT's MiCA, which has no ours; PEFT's data-aware inits run PEFT's preprocessing on
the batches ``SVDInit`` calibrates ours on).

Every method is trained by the same Lightning loop (same data order, steps, LR schedule, precision);
PEFT's adapters enter through the ``inject`` hook of ``LitSVDAdapter``. For each (method, seed) the script
records trainable parameters, training wall time and tokens/s, the GSM8K test loss (teacher-forced on the
reference solutions), greedy GSM8K test accuracy and, with ``--math-dir``, greedy MATH-500 accuracy, and
appends one JSON line. During training the teacher-forced loss of a fixed subset of GSM8K test (the first
``--curve-questions``, 256) is logged every ``--curve-every`` (50) steps as ``heldout/loss`` next to
``train/loss`` in ``<out>/runs/<method>/seed<k>``.
``--methods base`` evaluates the untrained model (once: it is deterministic, so only for the first seed).

Two modes:

- ``--grid lr1,lr2,...``: learning-rate search. Each (method, lr, seed) trains ``--grid-steps`` optimizer
  steps (same warmup + cosine shape, compressed) on GSM8K train minus ``--heldout-size`` held-out training
  problems (split seeded by the seed) and records the teacher-forced loss on them in ``grid.jsonl``. The
  PEFT variants get the same grid. GSM8K test is not touched.
- default: full runs (one epoch); ``--lr-from-grid`` takes each method's best learning rate from a grid.

``--shard i/N`` (0 ≤ i < N) runs every N-th job of the (seed, method[, lr]) list starting at i and appends to
``results.shard{i}.jsonl`` / ``grid.shard{i}.jsonl``, so N processes can share one GPU; ``collect.py``
merges the shard files, ``report.py`` tabulates and plots. On one H100, four shards (``OMP_NUM_THREADS``
keeps four processes from oversubscribing the CPU cores):

    mkdir -p runs/study
    export OMP_NUM_THREADS=4
    # 1. learning-rate grid (100 steps per run, held-out split of train)
    for i in 0 1 2 3; do
      python recipes/studies/gsm8k_methods.py --data-dir data/gsm8k \\
          --grid 5e-5,1e-4,2e-4,5e-4,1e-3,2e-3 --seeds 0 --shard $i/4 --out runs/study \\
          > runs/study/grid.shard$i.log 2>&1 &
    done
    wait
    python recipes/studies/collect.py runs/study          # writes grid.jsonl, prints the best LR per method

    # 2. full runs with the grid's learning rates, three seeds, GSM8K + MATH-500 evaluation
    for i in 0 1 2 3; do
      python recipes/studies/gsm8k_methods.py --data-dir data/gsm8k --math-dir data/math500 \\
          --seeds 0,1,2 --lr-from-grid runs/study/grid.jsonl --shard $i/4 --out runs/study \\
          > runs/study/results.shard$i.log 2>&1 &
    done
    wait
    python recipes/studies/collect.py runs/study          # writes results.jsonl

    # 3. tables, loss curves and a JSON summary (needs matplotlib)
    python recipes/studies/report.py runs/study

Times measured while several shards share the GPU (``"shard"`` in a record) are not throughput numbers;
``bench/`` measures those. Generation uses ``--eval-batch-size`` questions per ``generate`` call; lower it
(or ``--math-batch-size``) if four processes run out of GPU memory. See docs/reproduction.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import math
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch

# ``collect`` sits next to this script (the script's folder is sys.path[0] when it is run as a script).
from collect import KEYS, QUANTIZED, best_learning_rates, format_best, load_records, merge_records, read_jsonl
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lit_svd import AdapterConfig, merge_adapters, trainable_parameter_count
from lit_svd.attention import varying_shape_attention
from lit_svd.callbacks import SpectralMonitor, SVDInit
from lit_svd.data import GSM8KDataModule, InstructionCollator, MATHDataModule
from lit_svd.eval import evaluate
from lit_svd.models import load_causal_lm, load_tokenizer
from lit_svd.module import LitSVDAdapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Learning rates at batch 32 for SmolLM2 (r=16) when no grid is given: the best of the grid in
# docs/results/gsm8k_lr_grid.jsonl (100 steps, 500 held-out problems). Override with --lr method=value.
DEFAULT_LR = {
    "lora": 5e-3, "pissa": 1e-3, "olora": 5e-4, "sorsa": 2e-4, "osora": 2e-2,
    "dora": 5e-3, "vera": 1e-1, "milora": 5e-3, "corda": 1e-4, "eva": 5e-3, "loraga": 5e-3, "loftq": 5e-3,
}  # fmt: skip
# PEFT 0.21's implementation of a method, injected through ``PEFTAdapterModule``. ``mica`` (PEFT's Minor
# Component Adaptation: B = the minor left singular vectors, frozen) is not ours MiLoRA (docs/methods/milora.md):
# it has no ``ours`` row and borrows MiLoRA's rate unless the grid has its own.
PEFT_METHODS = ("lora", "pissa", "olora", "dora", "vera", "mica", "corda", "eva", "loraga")
PEFT_CALIBRATED = ("corda", "eva", "loraga")  # PEFT's preprocessing needs the train loader
LR_SOURCE = {"mica": "milora", **QUANTIZED}
ALL_METHODS = "base,lora,pissa,olora,sorsa,osora,peft-lora,peft-pissa,peft-olora"


def peft_config(method: str, adapter: AdapterConfig):
    """PEFT's configuration of ``method`` (a name of ``PEFT_METHODS``) for ``adapter``'s rank and targets.

    Scale 1 (``lora_alpha = r``) and no dropout as ours; CorDA's mode, EVA's ρ and VeRA's seed and ``d_initial``
    taken from ``adapter``; LoRA-GA at PEFT's defaults, which are ours (docs/methods/loraga.md).
    """
    import peft

    if method == "vera":
        return peft.VeraConfig(
            r=adapter.rank,
            target_modules=adapter.target_modules,
            projection_prng_key=adapter.vera_seed,
            d_initial=adapter.vera_d_initial,
        )
    init: dict[str, Any] = {
        "lora": {"init_lora_weights": True},
        "pissa": {"init_lora_weights": "pissa"},
        "olora": {"init_lora_weights": "olora"},
        "dora": {"init_lora_weights": True, "use_dora": True},
        "mica": {"init_lora_weights": "mica"},
        "corda": {"init_lora_weights": "corda"},
        "eva": {"init_lora_weights": "eva"},
        "loraga": {"init_lora_weights": "lora_ga"},
    }[method]
    if method == "corda":
        from peft.tuners.lora.config import CordaConfig

        init["corda_config"] = CordaConfig(corda_method=adapter.corda_mode)
    elif method == "eva":
        init["eva_config"] = peft.EvaConfig(rho=adapter.eva_rho)
    elif method == "loraga":
        init["lora_ga_config"] = peft.LoraGAConfig()
    return peft.LoraConfig(
        r=adapter.rank, lora_alpha=adapter.rank, target_modules=adapter.target_modules, lora_dropout=0.0, **init
    )


class PEFTAdapterModule(LitSVDAdapter):
    """The same LightningModule, with PEFT's implementation of ``peft_method`` injected instead of ours."""

    peft_method: str = "lora"

    def inject(self, model):
        import peft

        return peft.get_peft_model(model, peft_config(self.peft_method, self.adapter_config()))


class PEFTCalibratedModule(PEFTAdapterModule):
    """PEFT's data-aware inits (CorDA, EVA, LoRA-GA), preprocessed on the batches ``SVDInit`` calibrates ours on.

    The model stays bare until ``configure_model`` — the first hook where the train loader exists and the
    optimizer does not yet — which runs PEFT's preprocessing on the loader's first ``calibration_batches``
    batches (the length-grouped sampler's order is seeded, so these are the batches ``SVDInit`` takes) through
    ``compute_loss``, the same packed forward as training and as ours, then wraps the model.
    """

    calibration_batches: int = 8
    calibration_seconds: float | None = None

    def inject(self, model):
        return model  # wrapped in configure_model

    def configure_model(self) -> None:
        import peft
        from lightning.fabric.utilities.apply_func import move_data_to_device

        if isinstance(self.model, peft.PeftModel):
            return
        device = self.trainer.strategy.root_device
        self.model.to(device)
        # configure_model runs inside torch.device(root_device); PEFT's preprocessing expects the usual CPU default.
        with torch.device("cpu"):
            with torch.random.fork_rng(devices=[]):
                loader = self.trainer.datamodule.train_dataloader()
                batches = [move_data_to_device(b, device) for b in itertools.islice(loader, self.calibration_batches)]
            config = peft_config(self.peft_method, self.adapter_config())
            start = time.perf_counter()
            if self.peft_method == "corda":
                from peft.tuners.lora.corda import preprocess_corda

                def run_model() -> None:
                    # PEFT's hook squeezes a batch of 1 and scales each forward's inputs by their |max|: one
                    # sequence per forward (PEFT's examples; ours scales per sequence), the padding one left out.
                    # Without cuDNN attention, which would plan every new sequence length (as in compute_loss).
                    with torch.no_grad(), varying_shape_attention():
                        for sequence in _sequences(batches):
                            self.model(input_ids=sequence)

                preprocess_corda(self.model, config, run_model=run_model)
                self.model = peft.get_peft_model(self.model, config)
            elif self.peft_method == "eva":
                self.model = peft.get_peft_model(self.model, config, low_cpu_mem_usage=True)
                # PEFT's default input mask: tokens with a label (as ours); the forward is ours for packed rows.
                peft.initialize_lora_eva_weights(
                    self.model, batches, forward_fn=lambda _, batch: self.compute_loss(batch), show_progress_bar=False
                )
            elif self.peft_method == "loraga":
                from peft.tuners.lora.loraga import preprocess_loraga

                def train_step() -> None:
                    for batch in batches:
                        self.compute_loss(batch).backward()

                preprocess_loraga(self.model, config, train_step)
                self.model = peft.get_peft_model(self.model, config)
            else:
                raise ValueError(f"{self.peft_method!r} is not one of PEFT's data-aware inits {PEFT_CALIBRATED}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.calibration_seconds = time.perf_counter() - start


def _sequences(batches: list[dict[str, Any]]) -> Iterator[torch.Tensor]:
    """Each real sequence of padded or packed batches as its own ``(1, L)`` input ids."""
    for batch in batches:
        ids = batch["input_ids"]
        if "cu_seq_lens" in batch:
            bounds = batch["cu_seq_lens"].tolist()
            real = len(bounds) - 1 - (1 if batch.get("padding_tokens", 0) else 0)
            for start, end in zip(bounds[:real], bounds[1 : real + 1], strict=True):
                yield ids[:, start:end]
        else:
            for row, mask in zip(ids, batch["attention_mask"].bool(), strict=True):
                if mask.any():
                    yield row[mask][None]


def method_names(method: str) -> tuple[str, bool]:
    """``method`` of the study → (lit_svd method or PEFT method name, whether the base is 4-bit NF4)."""
    name = method.removeprefix("peft-")
    return QUANTIZED.get(name, name), name in QUANTIZED or name == "loftq"


@torch.no_grad()
def test_loss(model: torch.nn.Module, loader: DataLoader, device: torch.device, chunk_rows: int = 8) -> float:
    """Mean token NLL of the reference solutions given the prompts (labels −100 on prompt/padding).

    The model's train/eval mode is restored afterwards (this also runs in the middle of training).

    Args:
        model: a causal LM (merged, or still wrapped with adapters).
        loader: batches with ``input_ids``, ``attention_mask`` and ``labels``.
        device: where the model is.
        chunk_rows: rows per float32 cross-entropy; the (rows × length × vocab) float32 copy of the logits
            is what sets peak memory, so it is made a few rows at a time instead of for the whole batch.
    """
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=ids, attention_mask=mask).logits
            for start in range(0, ids.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                nll = torch.nn.functional.cross_entropy(
                    logits[rows, :-1].float().flatten(0, 1),
                    labels[rows, 1:].flatten(),
                    ignore_index=-100,
                    reduction="sum",
                )
                total += nll.item()
            count += int((labels[:, 1:] != -100).sum())
    finally:
        model.train(was_training)
    return total / count


class HeldoutLossCurve(Callback):
    """Log the teacher-forced loss of a fixed set as ``heldout/loss`` at step 0, every N steps and at the end.

    ``train/loss`` alone cannot show over-fitting or compare methods on equal data; a small fixed set scored
    at a few points gives each run a held-out curve for the price of a few forward passes. The training loss
    of every ``train_every_n_steps``-th step is kept too (``train_history``), so that a run's record carries
    both curves and the figure does not depend on the TensorBoard folders travelling with it.

    Args:
        loader: the fixed held-out batches (labels on the response tokens).
        every_n_steps: optimizer steps between evaluations.
        train_every_n_steps: optimizer steps between kept training losses.
    """

    def __init__(self, loader: DataLoader, every_n_steps: int = 50, train_every_n_steps: int = 10) -> None:
        self.loader = loader
        self.every_n_steps = every_n_steps
        self.train_every_n_steps = train_every_n_steps
        self.history: list[tuple[int, float]] = []
        self._train_losses: list[tuple[int, torch.Tensor]] = []

    @property
    def train_history(self) -> list[tuple[int, float]]:
        """``(optimizer steps done, training loss of that step)``; one device→host transfer when read."""
        if not self._train_losses:
            return []
        steps, losses = zip(*self._train_losses, strict=True)
        return list(zip(steps, torch.stack(losses).float().tolist(), strict=True))

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self.history and self.history[-1][0] == step:
            return  # e.g. the last step was a multiple of every_n_steps
        loss = test_loss(pl_module.model, self.loader, pl_module.device)
        self.history.append((step, loss))
        if trainer.logger is not None:
            trainer.logger.log_metrics({"heldout/loss": loss}, step=step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)  # after SVDInit (on_fit_start): the initialised, untrained adapters

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts optimizer steps and is already incremented for this batch's step.
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and trainer.global_step % self.train_every_n_steps == 0:
            self._train_losses.append((trainer.global_step, loss.detach()))  # no .item(): no sync per step
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)


# ----- job lists, shards, outputs ----------------------------------------------------------------------------
def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/N"`` → ``(i, N)`` with 0 ≤ i < N; ``None`` → ``(0, 1)`` (everything)."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise SystemExit(f"--shard {text}: need 0 <= i < N")
    return index, count


def output_file(out: Path, kind: str, shard: str | None) -> Path:
    """``results.jsonl`` / ``grid.jsonl``, or this shard's own ``{kind}.shard{i}.jsonl``."""
    return out / (f"{kind}.jsonl" if shard is None else f"{kind}.shard{parse_shard(shard)[0]}.jsonl")


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Print ``record`` and append it to ``path`` as one JSON line (written and flushed at once)."""
    line = json.dumps(record)
    print(line, flush=True)
    with path.open("a") as f:
        f.write(line + "\n")


def stamp(record: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Add when it finished (collect.py keeps the latest of duplicates) and which shard ran it."""
    record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if args.shard is not None:
        record["shard"] = args.shard
    if "steps" in record:
        record["packed_batches"] = args.pack
    return record


def choose_lr(method: str, args: argparse.Namespace) -> tuple[float, str]:
    """The learning rate of ``method`` and where it came from.

    Precedence: ``--lr`` (method, then its base name for ``peft-*``), then the grid (the method's own rows,
    then, for ``peft-*`` not in the grid, our implementation's best; for ``q*`` and ``peft-mica`` the method of
    ``LR_SOURCE``), then ``DEFAULT_LR``.
    """
    name = method.removeprefix("peft-")
    keys = list(dict.fromkeys([method, name, LR_SOURCE.get(name, name)]))
    for key in keys:
        if key in args.lr:
            return args.lr[key], "cli"
    for key in keys:
        if key in args.grid_best:
            return args.grid_best[key]["lr"], "grid" if key == method else f"grid:{key}"
    return DEFAULT_LR[keys[-1]], "default"


def release_memory() -> None:
    """Drop the finished run's tensors and hand cached GPU memory back: other shards share the GPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----- one run -----------------------------------------------------------------------------------------------
def gsm8k_data(args: argparse.Namespace, seed: int, **kwargs: Any) -> GSM8KDataModule:
    """The GSM8K datamodule of a run (tokenised with the shared tokenizer, set up for fitting)."""
    return GSM8KDataModule(
        data_dir=args.data_dir,
        max_length=args.max_length,
        batch_size=args.batch_size,
        eval_batch_size=args.loss_batch_size,
        group_by_length=True,
        pack_sequences=args.pack,
        seed=seed,
        cache_dir=args.cache_dir,
        max_train_examples=args.max_train_examples,
        **kwargs,
    )


def build_module(method: str, lr: float, args: argparse.Namespace, base_model, tokenizer) -> LitSVDAdapter:
    """A ``LitSVDAdapter`` (or its PEFT subclass) around a fresh copy of the base model."""
    name, quantized = method_names(method)
    adapter = AdapterConfig(
        method="lora" if method.startswith("peft-") else name,
        rank=args.rank,
        target_modules=TARGETS,
        adapter_dtype="float32",
        base_quantization="nf4" if quantized else None,
    )
    cls = LitSVDAdapter
    if method.startswith("peft-"):
        base = PEFTCalibratedModule if name in PEFT_CALIBRATED else PEFTAdapterModule
        cls = type("PEFT", (base,), {"peft_method": name})
    model = copy.deepcopy(base_model)  # PEFT's PiSSA/OLoRA and our SVD inits rewrite the base weights
    module = cls(model, adapter, tokenizer=None, learning_rate=lr, scheduler="cosine", warmup_ratio=0.03)
    module.tokenizer = tokenizer
    return module


def fit(module: LitSVDAdapter, data: GSM8KDataModule, args: argparse.Namespace, max_steps: int, logger, callbacks):
    """Train one epoch (or ``max_steps``); returns the trainer and the wall time in seconds."""
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        precision=args.precision,
        max_epochs=1,
        max_steps=max_steps,  # also the horizon of the cosine schedule (estimated_stepping_batches)
        gradient_clip_val=1.0,
        limit_val_batches=0,
        enable_checkpointing=False,
        log_every_n_steps=args.log_every,
        logger=logger,
        callbacks=[SVDInit(), *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return trainer, time.perf_counter() - start


def generation_accuracy(model, tokenizer, datamodule, batch_size: int, max_new_tokens: int, args, device):
    """Greedy accuracy of ``model`` on ``datamodule``'s evaluation set: (scores, seconds)."""
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        scores = evaluate(
            model,
            tokenizer,
            datamodule,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=False,
            compile=args.compile_eval,
            return_predictions=True,
        )
    return scores, time.perf_counter() - start


def run_one(method: str, seed: int, args: argparse.Namespace, base_model, tokenizer, out: Path) -> dict:
    """Train (unless ``base``) and evaluate one (method, seed); append the record to the results file."""
    L.seed_everything(seed)
    data = gsm8k_data(args, seed, max_eval_examples=args.loss_questions)
    data.set_tokenizer(tokenizer)
    data.setup("fit")  # val_size=0: builds the training set and the GSM8K test set (for the losses)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record: dict[str, Any] = {"method": method, "seed": seed}
    if method == "base":
        model = copy.deepcopy(base_model)
    else:
        lr, lr_source = choose_lr(method, args)
        module = build_module(method, lr, args, base_model, tokenizer)
        # A fixed subset (the first questions of GSM8K test) so every method and seed is scored on the same set.
        curve_set = data.eval_dataset.select(range(min(args.curve_questions, len(data.eval_dataset))))
        curve = HeldoutLossCurve(
            DataLoader(
                curve_set.select_columns(["input_ids", "prompt_length"]),
                args.loss_batch_size,
                collate_fn=InstructionCollator(data.pad_token_id, data.max_length),
            ),
            every_n_steps=args.curve_every,
            train_every_n_steps=args.log_every,
        )
        logger = TensorBoardLogger(out / "runs", name=method, version=f"seed{seed}")
        tokens = sum(min(int(n), args.max_length) for n in data.train_dataset["length"])  # non-padding tokens
        trainer, seconds = fit(module, data, args, args.max_steps, logger, [SpectralMonitor(every_n_steps=50), curve])
        record.update(
            lr=lr,
            lr_source=lr_source,
            trainable_parameters=trainable_parameter_count(module.model),
            train_seconds=round(seconds, 1),
            steps=trainer.global_step,
            final_train_loss=float(trainer.callback_metrics.get("train/loss", math.nan)),
            heldout_curve=[[step, round(loss, 5)] for step, loss in curve.history],
            train_curve=[[step, round(loss, 5)] for step, loss in curve.train_history],
            heldout_curve_questions=len(curve_set),
        )
        if tokens and trainer.global_step * args.batch_size >= len(data.train_dataset):
            record["tokens_per_second"] = round(tokens / seconds)
        model = module.model
        if getattr(module, "calibration_seconds", None) is not None:
            record["peft_calibration_seconds"] = round(module.calibration_seconds, 2)
        model = model.merge_and_unload() if method.startswith("peft-") else merge_adapters(model)
        del module, trainer
    model.to(device)
    record["test_loss"] = round(test_loss(model, data.eval_dataloader(args.loss_batch_size), device), 5)
    record["loss_questions"] = len(data.eval_dataset)
    gsm8k = GSM8KDataModule(
        data_dir=args.data_dir,
        max_length=args.max_length,
        eval_batch_size=args.eval_batch_size,
        max_eval_examples=args.eval_questions,
        cache_dir=args.cache_dir,
    )
    scores, seconds = generation_accuracy(
        model, tokenizer, gsm8k, args.eval_batch_size, args.max_new_tokens, args, device
    )
    verdicts = "".join("1" if p["correct"] else "0" for p in scores["predictions"])
    record.update(
        accuracy=scores["accuracy"],
        # Per-question verdicts (dataset order), so runs scored on different prefixes can be compared on
        # the common one (session-2 runs were scored on the first 400 questions).
        gsm8k_correct=verdicts,
        accuracy_first400=verdicts[:400].count("1") / min(len(verdicts), 400),
        eval_questions=scores["num_examples"],
        eval_seconds=round(seconds, 1),
        max_new_tokens=args.max_new_tokens,
    )
    if args.math_dir is not None:
        math500 = MATHDataModule(
            data_dir=args.math_dir,
            max_length=args.max_length,
            eval_batch_size=args.math_batch_size,
            max_eval_examples=args.math_questions,
            cache_dir=args.cache_dir,
        )
        scores, seconds = generation_accuracy(
            model, tokenizer, math500, args.math_batch_size, args.math_max_new_tokens, args, device
        )
        record.update(
            math500_correct="".join("1" if p["correct"] else "0" for p in scores["predictions"]),
            math500_accuracy=scores["accuracy"],
            math500_questions=scores["num_examples"],
            math500_eval_seconds=round(seconds, 1),
            math500_max_new_tokens=args.math_max_new_tokens,
        )
    append_record(output_file(out, "results", args.shard), stamp(record, args))
    del model
    release_memory()
    return record


def run_grid_one(
    method: str, lr: float | None, seed: int, args: argparse.Namespace, base_model, tokenizer, out: Path
) -> dict:
    """Train ``--grid-steps`` steps at ``lr`` and score the held-out training problems (``base``: no training)."""
    L.seed_everything(seed)
    data = gsm8k_data(args, seed, val_size=args.heldout_size)
    data.set_tokenizer(tokenizer)
    data.setup("fit")  # val_size > 0: training set and held-out split only; GSM8K test is not loaded
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record: dict[str, Any] = {"method": method, "lr": lr, "seed": seed}
    if method == "base":
        model = copy.deepcopy(base_model).to(device)
        record["steps"] = 0
    else:
        module = build_module(method, lr, args, base_model, tokenizer)
        logger = TensorBoardLogger(out / "grid_runs", name=method, version=f"lr{lr:g}_seed{seed}")
        trainer, seconds = fit(module, data, args, args.grid_steps, logger, [])
        record.update(
            steps=trainer.global_step,
            train_seconds=round(seconds, 1),
            final_train_loss=float(trainer.callback_metrics.get("train/loss", math.nan)),
        )
        model = module.model  # scored with the adapters in place: no merge needed for a loss
        del trainer
    model.to(device)  # Lightning hands the module back on the CPU after fit
    record["heldout_loss"] = round(test_loss(model, data.val_dataloader(), device), 5)
    record["heldout_examples"] = len(data.val_dataset)
    append_record(output_file(out, "grid", args.shard), stamp(record, args))
    del model
    release_memory()
    return record


# ----- command line ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring); derived fields: ``lr`` dict, ``grid`` list, ``grid_best``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir", required=True, help="folder with GSM8K train.jsonl and test.jsonl")
    parser.add_argument("--methods", default=ALL_METHODS, help=f"comma list (default: {ALL_METHODS})")
    parser.add_argument("--seeds", default="0", help="comma list of seeds")
    parser.add_argument("--out", default="runs/study", help="folder for the JSON lines and TensorBoard runs")
    parser.add_argument("--shard", default=None, help="i/N: run only the i-th (0-based) of N round-robin shares")
    training = parser.add_argument_group("training")
    training.add_argument("--lr", default="", help="comma list method=value, overriding grid and DEFAULT_LR")
    training.add_argument(
        "--lr-from-grid",
        default=None,
        help="grid.jsonl (or a study folder, merging its shard files): each method's best LR from it",
    )
    training.add_argument("--rank", type=int, default=16)
    training.add_argument("--batch-size", type=int, default=32)
    training.add_argument("--max-length", type=int, default=512)
    training.add_argument("--max-steps", type=int, default=-1, help="-1: one epoch")
    training.add_argument("--max-train-examples", type=int, default=None)
    training.add_argument(
        "--precision", default=None, help="Lightning precision (default: bf16-mixed with CUDA, else 32-true)"
    )
    training.add_argument(
        "--no-pack",
        dest="pack",
        action="store_false",
        help="pad length-grouped batches instead of packing them (same loss, slower)",
    )
    training.add_argument("--log-every", type=int, default=10, help="steps between train/loss log points")
    training.add_argument("--curve-every", type=int, default=50, help="steps between held-out curve points")
    training.add_argument("--curve-questions", type=int, default=256, help="GSM8K test questions of the held-out curve")
    grid = parser.add_argument_group("learning-rate grid")
    grid.add_argument("--grid", default=None, help="comma list of learning rates: run the grid instead")
    grid.add_argument("--grid-steps", type=int, default=100, help="optimizer steps per grid run")
    grid.add_argument("--heldout-size", type=int, default=500, help="training problems held out for the grid")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-batch-size", type=int, default=512, help="questions per generate call")
    evaluation.add_argument("--loss-batch-size", type=int, default=64, help="batch of the teacher-forced losses")
    evaluation.add_argument("--eval-questions", type=int, default=None, help="GSM8K test questions (default all)")
    evaluation.add_argument("--loss-questions", type=int, default=None, help="test examples for the loss (all)")
    evaluation.add_argument("--max-new-tokens", type=int, default=256, help="GSM8K generation budget")
    evaluation.add_argument("--compile-eval", action="store_true", help="static KV cache + compiled decoding")
    evaluation.add_argument("--math-dir", default=None, help="folder with MATH-500 test.jsonl: also score it")
    evaluation.add_argument("--math-questions", type=int, default=None, help="MATH-500 questions (default all)")
    evaluation.add_argument("--math-max-new-tokens", type=int, default=512)
    evaluation.add_argument("--math-batch-size", type=int, default=None, help="default: --eval-batch-size")
    parser.add_argument("--cache-dir", default=None, help="datasets cache folder")
    args = parser.parse_args(argv)
    parse_shard(args.shard)  # fail early on a malformed value
    args.lr = {k: float(v) for k, v in (item.split("=") for item in args.lr.split(",") if item)}
    args.grid = [float(v) for v in args.grid.split(",") if v] if args.grid else None
    args.methods = [m for m in args.methods.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    known = ["base", *DEFAULT_LR, *QUANTIZED, *(f"peft-{m}" for m in PEFT_METHODS)]
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(known)}")
    if args.precision is None:
        args.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    args.math_batch_size = args.math_batch_size or args.eval_batch_size
    args.grid_best = {}
    if args.lr_from_grid is not None:
        source = Path(args.lr_from_grid)
        rows = load_records(source, "grid") if source.is_dir() else merge_records(read_jsonl(source), KEYS["grid"])
        args.grid_best = best_learning_rates(rows)
        print(f"learning rates from {source}:\n{format_best(args.grid_best)}", flush=True)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index, count = parse_shard(args.shard)
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    base_model = load_causal_lm(args.model, dtype=dtype)
    tokenizer = load_tokenizer(args.model)
    if args.grid is not None:
        jobs = [
            (seed, method, lr)
            for seed in args.seeds
            for method in args.methods
            for lr in ([None] if method == "base" else args.grid)
        ]
        for seed, method, lr in jobs[index::count]:
            run_grid_one(method, lr, seed, args, base_model, tokenizer, out)
        # Other shards may still be running: this is the best LR over the grid rows written so far.
        print("best learning rates so far (collect.py merges all shards):")
        print(format_best(best_learning_rates(load_records(out, "grid"))), flush=True)
        return
    # The untrained model is deterministic (greedy decoding, no training): one seed suffices.
    jobs = [
        (seed, method)
        for seed in args.seeds
        for method in args.methods
        if not (method == "base" and seed != args.seeds[0])
    ]
    for seed, method in jobs[index::count]:
        run_one(method, seed, args, base_model, tokenizer, out)


if __name__ == "__main__":
    main()
