"""GSM8K with EVA on SmolLM2-135M-Instruct (offline, embedded) or any Hub model.

Run:  lightning run recipes/gsm8k_eva.py [--devices N --strategy ddp] [--key value …]
  or: python recipes/gsm8k_eva.py fit --config recipes/configs/gsm8k_eva.yaml
Defaults live in recipes/configs/gsm8k_eva.yaml; every key there can be overridden on the command line.
"""

from pathlib import Path

from lit_svd.cli import run_recipe
from lit_svd.data import GSM8KDataModule

if __name__ == "__main__":
    run_recipe(GSM8KDataModule, Path(__file__).parent / "configs" / "gsm8k_eva.yaml")
