"""Run by test_fsdp.py: a 2-process fit (gloo, CPU) under FSDP2 (``AdapterFSDPStrategy``) or DDP.

Usage: ``fsdp_script.py OUT_DIR NAME STRATEGY MAX_STEPS GAMMA [CKPT] [--export] [--method=M]``: STRATEGY
``fsdp`` or ``ddp``; CKPT resumes; M the adapter method (default ``sorsa``; the regulariser gap is SORSA's).
The base model is the saved tiny model in ``OUT_DIR/base``. A checkpoint is kept every 2 steps (one epoch).
Writes to OUT_DIR, from rank 0:

- ``adapter_<NAME>.pt``: the gathered adapter tensors after fit;
- ``spectra_<NAME>.pt``: SpectralMonitor's last measurement per layer;
- ``info_<NAME>.json``: how often the monitor gathered a base weight itself, and (FSDP) the largest
  difference between SORSA's regulariser (value and gradient) on the sharded factors and on the gathered
  ones;
- with ``--export``: ``merged_<NAME>`` and ``peft_<NAME>`` written by ``export_merged``/``export_peft_lora``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from ddp_script import CollectiveGuard  # noqa: E402
from lightning_helpers import RandomTokensData  # noqa: E402

import lit_svd.spectral  # noqa: E402
from lit_svd import AdapterConfig, adapter_layers, orthonormal_regularizer  # noqa: E402
from lit_svd.callbacks import SpectralMonitor, SVDInit  # noqa: E402
from lit_svd.linalg import orthonormality_error  # noqa: E402
from lit_svd.module import LitSVDAdapter  # noqa: E402
from lit_svd.strategies import AdapterFSDPStrategy  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def regularizer_gap(module: LitSVDAdapter) -> float:
    """Largest |difference| of L_orth and of its gradient: sharded factors vs the same factors gathered."""
    factors = [getattr(layer, n) for _, layer in adapter_layers(module.model) for n in layer.orthonormal_names]
    value = orthonormal_regularizer(module.model)
    grads = torch.autograd.grad(value, factors)
    full = [f.full_tensor().detach().requires_grad_(True) for f in factors]
    by_shape: dict = {}
    for f in full:
        by_shape.setdefault(tuple(f.shape), []).append(f)
    reference = torch.cat([orthonormality_error(torch.stack(group)) for group in by_shape.values()]).mean()
    reference_grads = torch.autograd.grad(reference, full)
    gaps = [abs(value.item() - reference.item())]
    gaps += [(g.full_tensor() - r).abs().max().item() for g, r in zip(grads, reference_grads, strict=True)]
    return max(gaps)


def main(
    out: Path, name: str, strategy: str, max_steps: int, gamma: float, ckpt: str | None, export: bool, method: str
) -> None:
    calls = {"weight_norm": 0}
    measure = lit_svd.spectral._weight_norm

    def counting_weight_norm(layer):
        calls["weight_norm"] += 1
        return measure(layer)

    lit_svd.spectral._weight_norm = counting_weight_norm
    L.seed_everything(0)
    config = AdapterConfig(method=method, rank=4, target_modules=TARGETS, gamma=gamma)
    module = LitSVDAdapter(str(out / "base"), config, learning_rate=1e-2, warmup_ratio=0.0)
    monitor = SpectralMonitor(every_n_steps=1, log_images=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=AdapterFSDPStrategy() if strategy == "fsdp" else "ddp",
        max_steps=max_steps,
        gradient_clip_val=1.0,
        logger=False,
        default_root_dir=str(out / name),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[
            CollectiveGuard(),
            SVDInit(),
            monitor,
            ModelCheckpoint(dirpath=out / name, every_n_train_steps=2, save_top_k=-1, filename="{step}"),
        ],
    )
    trainer.fit(module, datamodule=RandomTokensData(count=8, batch_size=2), ckpt_path=ckpt)
    state = module.adapter_state()  # a collective under FSDP: every rank
    info = {"weight_norm_calls": calls["weight_norm"]}
    if strategy == "fsdp" and method == "sorsa":
        info["regularizer_gap"] = regularizer_gap(module)
    if export:  # under FSDP every rank takes part (the adapter is gathered); rank 0 writes
        module.export_merged(out / f"merged_{name}")
        module.export_peft_lora(out / f"peft_{name}")
    if trainer.global_rank == 0:
        torch.save(state, out / f"adapter_{name}.pt")
        spectra = {k: (s.sv_drift, s.orth_U, s.orth_V, s.weight_change) for k, s in monitor.last_spectra.items()}
        torch.save(spectra, out / f"spectra_{name}.pt")
        (out / f"info_{name}.json").write_text(json.dumps(info))
    # Shut the process group down before the interpreter does: left to exit-time destructors, gloo's threads
    # were seen to abort the process ("terminate called without an active exception") on a loaded machine.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    methods = [a.removeprefix("--method=") for a in sys.argv[1:] if a.startswith("--method=")]
    main(
        Path(args[0]),
        args[1],
        args[2],
        int(args[3]),
        float(args[4]),
        args[5] if len(args) > 5 else None,
        export="--export" in sys.argv,
        method=methods[0] if methods else "sorsa",
    )
