"""The public names of ``lit_svd``: exactly these, each importable, and ``import lit_svd`` stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import lit_svd

PUBLIC_NAMES = [
    "EMBEDDED_MODEL",
    "AdapterConfig",
    "AdapterLayer",
    "CommonsenseDataModule",
    "GSM8KDataModule",
    "InstructionDataModule",
    "LitSVDAdapter",
    "MATHDataModule",
    "MetaMathQADataModule",
    "RunSummary",
    "SVDInit",
    "SpectralMonitor",
    "adapter_layers",
    "adapter_state_dict",
    "available_adapters",
    "evaluate",
    "export_merged",
    "export_peft_lora",
    "get_adapter_class",
    "initialize_adapters",
    "inject_adapters",
    "load_adapter_state_dict",
    "load_causal_lm",
    "load_tokenizer",
    "merge_adapters",
    "orthonormal_regularizer",
    "register",
    "run_recipe",
    "trainable_parameter_count",
]


def test_public_names_are_pinned():
    # A name added or removed here is an API change: update this list on purpose.
    assert sorted(lit_svd.__all__) == sorted(PUBLIC_NAMES)
    assert len(set(lit_svd.__all__)) == len(lit_svd.__all__)
    assert set(lit_svd._EXPORTS) == set(lit_svd.__all__)  # the lazy table and __all__ agree


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_every_public_name_resolves_to_its_defining_module(name):
    import importlib

    value = getattr(lit_svd, name)
    assert value is getattr(importlib.import_module(lit_svd._EXPORTS[name]), name)
    assert name in dir(lit_svd)


def test_the_headline_import_of_the_readme_works():
    from lightning.pytorch import Callback, LightningDataModule, LightningModule

    from lit_svd import GSM8KDataModule, LitSVDAdapter, SpectralMonitor, SVDInit  # noqa: F401

    assert issubclass(LitSVDAdapter, LightningModule)
    assert issubclass(SVDInit, Callback) and issubclass(SpectralMonitor, Callback)
    assert issubclass(GSM8KDataModule, LightningDataModule)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'lit_svd' has no attribute 'LitSVDAdaptor'"):
        lit_svd.LitSVDAdaptor  # noqa: B018
    assert not hasattr(lit_svd, "LitSVDAdaptor")


def _modules_after(code: str) -> list[str]:
    script = (
        f"import sys, json\n{code}\n"
        "heavy = ('torch', 'lightning', 'pytorch_lightning', 'transformers', 'datasets', 'jsonargparse')\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_lit_svd_does_not_import_torch_lightning_or_transformers():
    assert _modules_after("import lit_svd; lit_svd.__version__") == []
    # star-import resolves every name, so it does load them (the check above is not vacuous)
    assert {"torch", "lightning", "transformers"} <= set(_modules_after("from lit_svd import *"))
