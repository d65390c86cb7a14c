"""Run by test_ddp.py: 2-process DDP (gloo, CPU) fit; each rank writes adapter checksums to OUT_DIR.

Rank 1 deliberately uses another SVD algorithm, so only the broadcast in SVDInit can make the factors
bit-identical across ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_model  # noqa: E402
from lightning_helpers import RandomTokensData  # noqa: E402

from lit_svd import AdapterConfig  # noqa: E402
from lit_svd.callbacks import SVDInit, adapter_checksum  # noqa: E402
from lit_svd.module import LitSVDAdapter  # noqa: E402


class RecordChecksums(L.Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.values = out_dir, {}

    def on_fit_start(self, trainer, pl_module):
        self.values["after_init"] = int(adapter_checksum(pl_module))

    def on_fit_end(self, trainer, pl_module):
        self.values["after_fit"] = int(adapter_checksum(pl_module))
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.values))


def main(out_dir: Path, method: str) -> None:
    L.seed_everything(0)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    config = AdapterConfig(
        method=method, rank=4, target_modules=["q_proj", "down_proj"], svd_method=["full", "gram"][local_rank]
    )
    module = LitSVDAdapter(make_tiny_model("llama"), config, learning_rate=1e-2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[SVDInit(), RecordChecksums(out_dir)],
    )
    trainer.fit(module, datamodule=RandomTokensData(count=24, batch_size=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
