"""Under DDP (2 CPU processes, gloo) every rank ends with bit-identical adapters, and no step re-sends buffers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_script.py")


# DoRA (magnitude vector, LoRA init) and VeRA (projections re-derived from the seed on every rank) decompose
# nothing; the SVD methods share their decompositions, also before quantizing the residual to 4 bits.
@pytest.mark.parametrize(
    ("method", "decomposed"), [("sorsa", 2), ("pissa", 2), ("dora", 0), ("vera", 0), ("sorsa:nf4", 2)]
)
def test_ddp_ranks_hold_identical_adapters(method, decomposed, tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), method], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["after_init"] == ranks[1]["after_init"]
    assert ranks[0]["after_fit"] == ranks[1]["after_fit"]
    assert ranks[0]["after_fit"] != ranks[0]["after_init"]  # training did move the adapters
    # The decompositions were shared: each rank did its half of the 4 matrices (2 layers × q_proj, down_proj).
    assert [r["decomposed"] for r in ranks] == [decomposed, decomposed] and ranks[0]["count"] == 4
    # Factors were broadcast, and checksums all-gathered after init and after training, under the guard.
    assert ranks[0]["collectives"]["broadcast"] >= 2 and ranks[0]["collectives"]["all_gather"] >= 2
    # AdapterDDPStrategy sends no buffers in training steps (Lightning's default DDP sends them all, the init
    # snapshots included, before every forward: 3 coalesced broadcasts in these 3 steps).
    assert [r["step_broadcasts"] for r in ranks] == [0, 0]


def test_ddp_calibration_statistics_are_reduced_across_ranks(tmp_path):
    """Each rank calibrates on other batches; both end with the adapters of one process calibrated on all.

    EVA: its statistics are three sums (xᵀx, x, token count); CorDA's are two of the same kind.
    """
    method = "eva"
    import torch
    from conftest import make_tiny_model
    from lightning_helpers import RandomTokensData

    from lit_svd import AdapterConfig, adapter_state_dict, inject_adapters
    from lit_svd.calibration import calibrate

    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), method], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["after_init"] == ranks[1]["after_init"] and ranks[0]["collectives"]["all_reduce"] >= 3
    assert [r["calibration_batches"] for r in ranks] == [3, 3]
    # One process calibrating on all 6 batches the two ranks shared out gives the same adapters.
    config = AdapterConfig(method=method, rank=4, target_modules=["q_proj", "down_proj"])
    model = inject_adapters(make_tiny_model("llama"), config, initialize=False)
    loader = RandomTokensData(count=24, batch_size=2).train_dataloader()
    calibrate(model, [batch for _, batch in zip(range(6), loader, strict=False)])
    single = adapter_state_dict(model)
    ddp = torch.load(tmp_path / "rank0_init.pt")
    for key, value in single.items():
        diff = (ddp[key].float() - value.float()).abs().max().item()
        assert diff < 1e-4, (key, diff)  # float32 sums in another order (measured 3e-5); rank 0's batches alone: 0.9


def test_ddp_static_graph_trains_the_same_adapters(tmp_path):
    """DDP(static_graph=True) skips per-step bookkeeping; the all-reduced gradients, so the adapters, are equal."""
    after_fit = {}
    for strategy in ("lit_svd_ddp", "lit_svd_ddp_static"):
        out = tmp_path / strategy
        out.mkdir()
        result = subprocess.run(
            [sys.executable, str(SCRIPT), str(out), "sorsa", strategy], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["after_fit"] == ranks[1]["after_fit"] != ranks[0]["after_init"]
        after_fit[strategy] = ranks[0]["after_fit"]
    assert after_fit["lit_svd_ddp_static"] == after_fit["lit_svd_ddp"]


def test_ddp_gradient_dtype_is_checked_and_chooses_the_compression_hook():
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from lit_svd.strategies import AdapterDDPStrategy

    assert AdapterDDPStrategy()._ddp_comm_hook is None
    assert AdapterDDPStrategy(gradient_dtype="bfloat16")._ddp_comm_hook is default_hooks.bf16_compress_hook
    assert AdapterDDPStrategy()._ddp_kwargs["broadcast_buffers"] is False
    assert "bucket_cap_mb" not in AdapterDDPStrategy()._ddp_kwargs  # PyTorch's default (25 MB)
    one_bucket = AdapterDDPStrategy(bucket_cap_mb=2048, gradient_as_bucket_view=True)._ddp_kwargs
    assert one_bucket["bucket_cap_mb"] == 2048 and one_bucket["gradient_as_bucket_view"] is True
    assert AdapterDDPStrategy()._ddp_kwargs["static_graph"] is False
    assert AdapterDDPStrategy(static_graph=True)._ddp_kwargs["static_graph"] is True
    with pytest.raises(ValueError, match="gradient_dtype 'bf16' is not one of"):
        AdapterDDPStrategy(gradient_dtype="bf16")
