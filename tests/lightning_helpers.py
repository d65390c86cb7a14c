"""Small Lightning fixtures shared by the module/callback tests: random token batches, tiny Trainers."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, Dataset


class RandomTokens(Dataset):
    """Deterministic random sequences; the first 3 tokens are a 'prompt' masked out of the labels."""

    def __init__(self, count: int = 16, length: int = 12, vocab: int = 101, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (count, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[:3] = -100
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


class RandomTokensData(LightningDataModule):
    def __init__(self, count: int = 16, batch_size: int = 4) -> None:
        super().__init__()
        self.count, self.batch_size = count, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokens(self.count), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokens(8, seed=1), batch_size=self.batch_size)


def quiet_cpu_trainer(root, max_steps: int, **kwargs) -> Trainer:
    """A CPU ``Trainer`` with ``SVDInit`` and nothing else: no logger, checkpoints, progress bar or summary.

    ``kwargs`` add Trainer arguments or replace these defaults (e.g. ``callbacks``, ``logger``).
    """
    from lit_svd.callbacks import SVDInit

    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SVDInit()],
        default_root_dir=root,
    )
    return Trainer(max_steps=max_steps, **(defaults | kwargs))
