"""SORSA's orthonormality error with and without the regulariser, on a tiny random Llama (CPU, ~1 min).

Run from the repository root:

    python docs/examples/orthonormality_experiment.py [--steps 300] [--lrs 1e-2 5e-2] [--gammas 4e-4 0]

Prints, for every (learning rate, γ), the largest ‖UᵀU − I‖_F and ‖VᵀV − I‖_F over the adapted layers at a
few optimizer steps, the mean singular-value drift and relative weight change, and one batch's training
loss. The numbers quoted in docs/monitoring.md come from this script. The model and data are random:
this shows how the *metrics* behave, not how well any method learns.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from lit_svd import AdapterConfig
from lit_svd.callbacks import SpectralMonitor, SVDInit
from lit_svd.module import LitSVDAdapter

VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 64, MLP 128) with weights spread wide enough for a non-trivial spectrum."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


class RandomTokens(Dataset):
    """Fixed random sequences; the first 4 tokens are a prompt masked out of the labels."""

    def __init__(self, count: int = 64, length: int = 16, seed: int = 0) -> None:
        self.ids = torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[:4] = -100
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


class Record(L.Callback):
    """Copies the monitor's per-layer spectra every time it measured."""

    def __init__(self, monitor: SpectralMonitor) -> None:
        self.monitor, self.rows = monitor, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, spectra = trainer.global_step, self.monitor.last_spectra
        measured_now = step % self.monitor.every_n_steps == 0 or step == 1
        if spectra and measured_now and (not self.rows or self.rows[-1][0] != step):
            orth = max(max(s.orth_U, s.orth_V) for s in spectra.values())
            drift = sum(s.sv_drift for s in spectra.values()) / len(spectra)
            change = sum(s.weight_change for s in spectra.values()) / len(spectra)
            self.rows.append((step, orth, drift, change, float(outputs["loss"])))


def run(lr: float, gamma: float, steps: int, rank: int = 8) -> list[tuple[int, float, float, float, float]]:
    L.seed_everything(0, verbose=False)
    config = AdapterConfig(method="sorsa", rank=rank, gamma=gamma, target_modules="all-linear")
    module = LitSVDAdapter(tiny_llama(), config, learning_rate=lr, scheduler="constant", warmup_ratio=0.0)
    monitor = SpectralMonitor(every_n_steps=max(1, steps // 6), log_images=False)
    record = Record(monitor)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[SVDInit(), monitor, record],
    )
    data = DataLoader(RandomTokens(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(module, train_dataloaders=data)
    return record.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 5e-2])
    parser.add_argument("--gammas", type=float, nargs="+", default=[4e-4, 0.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| lr | γ | step | max orth error (U or V) | mean sv_drift | mean weight change | train loss |")
    print("|---|---|---|---|---|---|---|")
    for lr in args.lrs:
        for gamma in args.gammas:
            start = time.perf_counter()
            for step, orth, drift, change, loss in run(lr, gamma, args.steps):
                print(f"| {lr:g} | {gamma:g} | {step} | {orth:.2e} | {drift:.3f} | {change:.3f} | {loss:.3f} |")
            print(f"<!-- lr {lr:g}, γ {gamma:g}: {time.perf_counter() - start:.0f} s -->")


if __name__ == "__main__":
    main()
