"""MetaMathQA with SORSA, evaluated on GSM8K (+ MATH) on SmolLM2-135M-Instruct (offline, embedded) or any Hub model.

Run:  lightning run recipes/metamath_sorsa.py [--devices N --strategy ddp] [--key value …]
  or: python recipes/metamath_sorsa.py fit --config recipes/configs/metamath_sorsa.yaml
Defaults live in recipes/configs/metamath_sorsa.yaml; every key there can be overridden on the command line.
"""

from pathlib import Path

from lit_svd.cli import run_recipe
from lit_svd.data import MetaMathQADataModule

if __name__ == "__main__":
    run_recipe(MetaMathQADataModule, Path(__file__).parent / "configs" / "metamath_sorsa.yaml")
