"""Commonsense reasoning with OSoRA on SmolLM2-135M-Instruct (offline, embedded) or any Hub model.

Run:  lightning run recipes/commonsense_osora.py [--devices N --strategy ddp] [--key value …]
  or: python recipes/commonsense_osora.py fit --config recipes/configs/commonsense_osora.yaml
Defaults live in recipes/configs/commonsense_osora.yaml; every key there can be overridden on the command line.
"""

from pathlib import Path

from lit_svd.cli import run_recipe
from lit_svd.data import CommonsenseDataModule

if __name__ == "__main__":
    run_recipe(CommonsenseDataModule, Path(__file__).parent / "configs" / "commonsense_osora.yaml")
