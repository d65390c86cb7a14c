"""FSDP2 (``AdapterFSDPStrategy``) with 2 CPU processes (gloo): init before sharding, training equal to
DDP's, exact resume from a sharded checkpoint, SORSA's regulariser on shards, monitoring and export.

NCCL's placement rules are applied on the CPU by ``CollectiveGuard`` (tests/ddp_script.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from lit_svd import AdapterConfig, inject_adapters, load_adapter_state_dict, merge_adapters

SCRIPT = Path(__file__).with_name("fsdp_script.py")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _run(out: Path, *fits: tuple[str, ...]) -> None:
    """The given 2-process fits of ``fsdp_script.py``, at the same time: most of a fit's time is its processes'
    start-up (imports), which overlaps on two cores; the fits share nothing but the saved base model."""
    processes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for args in fits
    ]
    try:
        for args, process in zip(fits, processes, strict=True):
            _, stderr = process.communicate(timeout=240)
            assert process.returncode == 0, f"{args}: {stderr[-4000:]}"
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Three 2-process fits of 4 steps on a saved tiny Llama: FSDP (+ export), DDP, FSDP resumed at step 2."""
    out = tmp_path_factory.mktemp("fsdp")
    make_tiny_model("llama").save_pretrained(out / "base")
    vocab = {f"t{i}": i for i in range(101)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0", eos_token="t1"
    )
    tokenizer.save_pretrained(out / "base")
    # γ = 0 where FSDP is compared with DDP: at init L_orth ≈ 1e-6 is rounding noise, and the gradient of
    # the (unsquared) norm there is a unit vector pointing wherever the noise does, which differs between a
    # sum of shard Gram matrices and one full Gram matrix. The regulariser is checked on its own below.
    _run(out, ("fsdp", "fsdp", "4", "0", "--export"), ("ddp", "ddp", "4", "0"))
    _run(out, ("resumed", "fsdp", "4", "0", str(out / "fsdp" / "step=2.ckpt")))
    return out


@pytest.mark.timeout(600)
def test_fsdp_trains_like_ddp_and_resumes_exactly(runs):
    fsdp, ddp, resumed = (torch.load(runs / f"adapter_{n}.pt") for n in ("fsdp", "ddp", "resumed"))
    # Same global batches and updates; only the order of floating-point reductions differs.
    assert _max_difference(fsdp, ddp) < 1e-5
    # The sharded checkpoint restores adapters, optimizer state and residuals bit for bit.
    assert _max_difference(fsdp, resumed) == 0.0
    checkpoint = runs / "fsdp" / "step=2.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard file per rank


@pytest.mark.timeout(600)
def test_regularizer_and_monitor_work_on_shards(runs):
    info = json.loads((runs / "info_fsdp.json").read_text())
    # L_orth and its gradient from per-shard Gram matrices equal those of the gathered factors.
    assert info["regularizer_gap"] < 1e-6
    # ‖W_0‖ came from SVDInit (measured before sharding), and on resume from the checkpoint: the monitor
    # never gathered a base weight.
    assert info["weight_norm_calls"] == 0
    assert json.loads((runs / "info_resumed.json").read_text())["weight_norm_calls"] == 0
    fsdp, ddp = torch.load(runs / "spectra_fsdp.pt"), torch.load(runs / "spectra_ddp.pt")
    assert fsdp.keys() == ddp.keys() and len(fsdp) == 6
    for key in fsdp:
        assert max(abs(a - b) for a, b in zip(fsdp[key], ddp[key], strict=True)) < 1e-4, key


@pytest.mark.timeout(600)
def test_export_from_the_sharded_run_equals_a_single_process_export(runs):
    state = torch.load(runs / "adapter_fsdp.pt")
    single = AutoModelForCausalLM.from_pretrained(runs / "base")
    inject_adapters(single, AdapterConfig(method="sorsa", rank=4, target_modules=TARGETS), initialize=False)
    load_adapter_state_dict(single, state)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = merge_adapters(single).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(runs / "merged_fsdp").eval()
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-5)

    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(runs / "base")
    served = peft.PeftModel.from_pretrained(base, runs / "peft_fsdp").eval()
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, expected, rtol=0, atol=1e-4)


@pytest.fixture(scope="module", params=["dora", "vera", "corda", "loraga"])
def method_runs(request, runs) -> tuple[str, Path]:
    """DoRA (magnitude vector; its monitor needs the base rows), VeRA (projections shared by every layer) and
    two data-aware inits calibrated before sharding (CorDA: input covariances; LoRA-GA: gradients, a backward
    pass through the host model): FSDP (+ export) and DDP, 4 steps each, on the saved tiny Llama of ``runs``."""
    method = request.param
    _run(
        runs,
        (f"fsdp_{method}", "fsdp", "4", "0", "--export", f"--method={method}"),
        (f"ddp_{method}", "ddp", "4", "0", f"--method={method}"),
    )
    return method, runs


@pytest.mark.timeout(600)
def test_more_methods_train_monitor_and_export_under_fsdp_as_under_ddp(method_runs):
    method, runs = method_runs
    fsdp, ddp = (torch.load(runs / f"adapter_{n}_{method}.pt") for n in ("fsdp", "ddp"))
    assert _max_difference(fsdp, ddp) < 1e-5
    # The monitor's measurements (DoRA's weight change from the base rows each rank holds, summed over ranks)
    # equal DDP's, and no base weight was gathered for them.
    spectra_fsdp, spectra_ddp = (torch.load(runs / f"spectra_{n}_{method}.pt") for n in ("fsdp", "ddp"))
    assert spectra_fsdp.keys() == spectra_ddp.keys() and len(spectra_fsdp) == 6
    for key in spectra_fsdp:
        assert spectra_fsdp[key][3] > 0  # the weight did change
        assert max(abs(a - b) for a, b in zip(spectra_fsdp[key], spectra_ddp[key], strict=True)) < 1e-6, key
    assert json.loads((runs / f"info_fsdp_{method}.json").read_text())["weight_norm_calls"] == 0
    single = AutoModelForCausalLM.from_pretrained(runs / "base")
    inject_adapters(single, AdapterConfig(method=method, rank=4, target_modules=TARGETS), initialize=False)
    load_adapter_state_dict(single, fsdp)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = merge_adapters(single).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(runs / f"merged_fsdp_{method}").eval()
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-5)


def test_strategy_names_on_the_command_line_mean_lit_svd_strategies():
    from lit_svd.cli import launcher_trainer_overrides, recipe_strategy

    launched = {"LT_CLI_USED": "1", "LT_ACCELERATOR": "cpu", "LT_DEVICES": "2"}
    assert launcher_trainer_overrides(launched | {"LT_STRATEGY": "fsdp"})["strategy"] == "lit_svd_fsdp"
    assert launcher_trainer_overrides(launched | {"LT_STRATEGY": "ddp"})["strategy"] == "lit_svd_ddp"
    with pytest.raises(ValueError, match="fsdp_cpu_offload is Lightning's FSDP1 variant"):
        launcher_trainer_overrides(launched | {"LT_STRATEGY": "fsdp_cpu_offload"})
    # `--trainer.strategy` without the launcher goes through the same table; other strategies stay as given.
    assert [recipe_strategy(s) for s in ("ddp", "fsdp", "ddp_spawn", None)] == [
        "lit_svd_ddp",
        "lit_svd_fsdp",
        "ddp_spawn",
        None,
    ]


def test_fsdp_gathers_float32_adapters_in_the_autocast_dtype_and_reduces_in_float32():
    from lit_svd.strategies import fsdp_mixed_precision

    model = make_tiny_model("llama").to(torch.bfloat16)
    inject_adapters(model, AdapterConfig(method="sorsa", rank=2, target_modules=TARGETS))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    policy = fsdp_mixed_precision(model, "bf16-mixed")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp_mixed_precision(model, "32-true") is None  # no autocast: each tensor gathered as it is
    model.to(torch.bfloat16)  # adapters already in the compute dtype: nothing to cast
    assert fsdp_mixed_precision(model, "bf16-mixed") is None


def test_a_checkpoint_file_is_refused_by_name_under_fsdp(tmp_path):
    from lit_svd.strategies import AdapterFSDPStrategy

    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, checkpoint)
    strategy = AdapterFSDPStrategy()
    with pytest.raises(ValueError, match=f"{checkpoint} is not a sharded lit_svd checkpoint folder"):
        strategy.load_checkpoint(checkpoint)
