"""Check that every process ends with identical adapters: SORSA on a tiny random Llama, a few steps.

Run on N GPUs (or CPU processes with ``--accelerator cpu``), from the repository root:

    python docs/examples/distributed_check.py --devices 2 --strategy ddp
    lightning run --devices 2 --strategy ddp docs/examples/distributed_check.py

Rank 1 deliberately computes its SVD with another algorithm (``svd_method="full"`` vs ``"gram"``), so only
SVDInit's broadcast from rank 0 can make the factors bit-identical. Rank 0 prints one line per stage with
the adapter checksum of every rank (``lit_svd.callbacks.adapter_checksum``) and whether they agree.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from lit_svd import AdapterConfig
from lit_svd.callbacks import SVDInit, adapter_checksum
from lit_svd.module import LitSVDAdapter


class RandomTokens(Dataset):
    def __init__(self, count: int = 64, length: int = 32) -> None:
        self.ids = torch.randint(0, 256, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[:4] = -100
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


class CompareAcrossRanks(L.Callback):
    """All-gathers the adapter checksum after init (fit start) and after training (train end: at fit end
    DDP's teardown has already moved the module to the CPU, which NCCL cannot all-gather)."""

    def __init__(self) -> None:
        self.results: dict[str, bool] = {}

    def _compare(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        checksum = adapter_checksum(pl_module, device=trainer.strategy.root_device)
        gathered = trainer.strategy.all_gather(checksum).flatten().tolist()
        self.results[stage] = len(set(gathered)) == 1
        if trainer.is_global_zero:
            print(f"[{stage}] world_size={trainer.world_size} checksums={gathered} identical={self.results[stage]}")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._compare(trainer, pl_module, "after SVDInit")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._compare(trainer, pl_module, "after training")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--method", default="sorsa")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    L.seed_everything(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    svd_method = ["gram", "full"][local_rank % 2]
    config = AdapterConfig(method=args.method, rank=8, target_modules="all-linear", svd_method=svd_method)
    module = LitSVDAdapter(model, config, learning_rate=1e-3)
    # SVDInit runs first, so CompareAcrossRanks.on_fit_start sees the initialised adapters.
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        max_steps=args.steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SVDInit(), CompareAcrossRanks()],
    )
    trainer.fit(module, train_dataloaders=DataLoader(RandomTokens(), batch_size=4))


if __name__ == "__main__":
    main()
