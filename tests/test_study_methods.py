"""The reproduction study's PEFT rows of data-aware inits calibrate on the batches ``SVDInit`` takes for ours.

``recipes/studies/gsm8k_methods.py`` runs PEFT's CorDA/EVA/LoRA-GA preprocessing in ``configure_model`` on the
first train batches; the docs claim these are ours' calibration batches. With more train batches than
calibration batches, CorDA's residual weight depends on which ones were taken: equal residuals on both sides
say the batches (and the packed forward through ``compute_loss``) are the same.
"""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch
from _recipe_fixtures import REPO, save_tiny_llama
from conftest import DATA_DIR

from lit_svd import adapter_layers
from lit_svd.models import load_causal_lm, load_tokenizer

sys.path.insert(0, str(REPO / "recipes" / "studies"))
import gsm8k_methods as study  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def _initialised(method: str, args, base, tokenizer) -> torch.nn.Module:
    """The study's module for ``method`` after fit's initialisation (no optimizer step)."""
    L.seed_everything(0)
    data = study.gsm8k_data(args, seed=0)
    data.set_tokenizer(tokenizer)
    data.setup("fit")
    module = study.build_module(method, 1e-3, args, base, tokenizer)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[study.SVDInit(calibration_batches=4)],
    )  # fmt: skip
    module.calibration_batches = 4  # PEFT's side (PEFTCalibratedModule)
    trainer.fit(module, datamodule=data)
    return module.model


def test_peft_corda_residual_equals_ours(tmp_path):
    folder = save_tiny_llama(tmp_path / "tiny")
    args = study.parse_args(
        ["--model", str(folder), "--data-dir", str(DATA_DIR / "gsm8k"), "--rank", "4", "--batch-size", "4",
         "--max-train-examples", "48", "--precision", "32-true"]
    )  # fmt: skip
    base = load_causal_lm(str(folder), dtype=torch.float32)
    tokenizer = load_tokenizer(str(folder))
    ours = _initialised("corda", args, base, tokenizer)
    theirs = _initialised("peft-corda", args, base, tokenizer)
    residuals = {name: layer.base_layer.weight for name, layer in adapter_layers(ours)}
    assert residuals
    for name, weight in residuals.items():
        peft_weight = theirs.get_submodule("base_model.model." + name).base_layer.weight
        assert not torch.equal(weight, base.get_submodule(name).weight)  # the init moved a part out of W
        torch.testing.assert_close(weight, peft_weight, rtol=0, atol=1e-4)
