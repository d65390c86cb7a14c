"""LightningCLI glue for the recipes: YAML defaults, ``lightning run`` settings, export after fit.

A recipe is ``run_recipe(GSM8KDataModule, "recipes/configs/gsm8k_sorsa.yaml")``. With no subcommand the
recipe fits; ``--config`` files and ``--key value`` flags override the recipe's YAML. Launched through
``lightning run --devices N --strategy ddp …`` the launcher's choices (``LT_*`` environment variables, as
``fabric run`` sets them) become the Trainer's defaults.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_svd.module import LitSVDAdapter

__all__ = ["LitSVDCLI", "run_recipe", "launcher_trainer_overrides"]

_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def launcher_trainer_overrides(environ: dict[str, str] | None = None) -> dict[str, object]:
    """Trainer settings chosen on the ``lightning run`` / ``fabric run`` command line (``LT_*`` variables)."""
    env = os.environ if environ is None else environ
    if env.get("LT_CLI_USED") != "1":
        return {}
    overrides: dict[str, object] = {}
    if "LT_ACCELERATOR" in env:
        overrides["accelerator"] = env["LT_ACCELERATOR"]
    if "LT_STRATEGY" in env:
        overrides["strategy"] = env["LT_STRATEGY"]
    if "LT_DEVICES" in env:
        devices = env["LT_DEVICES"]
        overrides["devices"] = int(devices) if devices.isdigit() else devices
    if "LT_NUM_NODES" in env:
        overrides["num_nodes"] = int(env["LT_NUM_NODES"])
    if "LT_PRECISION" in env:
        overrides["precision"] = env["LT_PRECISION"]
    accelerator, strategy = overrides.get("accelerator"), str(overrides.get("strategy", ""))
    if strategy.startswith("fsdp") and accelerator == "cpu":
        raise ValueError("--strategy fsdp needs CUDA GPUs; on CPU use --strategy ddp (gloo)")
    return overrides


class LitSVDCLI(LightningCLI):
    """LightningCLI for ``LitSVDAdapter`` plus ``--export.merged_dir`` / ``--export.peft_dir`` after fit."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--export.merged_dir", type=str | None, default=None, help="write a merged HF model here after fit"
        )
        parser.add_argument(
            "--export.peft_dir", type=str | None, default=None, help="write a PEFT LoRA adapter here after fit"
        )

    def before_instantiate_classes(self) -> None:
        overrides = launcher_trainer_overrides()
        if overrides:
            config = self.config[self.subcommand] if self.subcommand else self.config
            for key, value in overrides.items():
                config.trainer[key] = value

    def after_fit(self) -> None:
        export = self.config[self.subcommand].get("export") or {}
        if not self.trainer.is_global_zero:
            return
        if export.get("merged_dir"):
            path = self.model.export_merged(export["merged_dir"], overwrite=True)
            rank_zero_info(f"merged model written to {path}")
        if export.get("peft_dir"):
            path = self.model.export_peft_lora(export["peft_dir"], overwrite=True)
            rank_zero_info(f"PEFT LoRA adapter written to {path}")


def run_recipe(datamodule_class: type, config_file: str | os.PathLike, args: list[str] | None = None) -> LitSVDCLI:
    """Run a recipe: ``fit`` unless another subcommand is given, with ``config_file`` as YAML defaults."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] not in _SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["fit", *argv]
    config_file = Path(config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"recipe config not found: {config_file}")
    defaults = {"default_config_files": [str(config_file)]}
    if args is None:  # LightningCLI reads sys.argv itself (and warns when both are given)
        sys.argv[1:] = argv
    return LitSVDCLI(
        LitSVDAdapter,
        datamodule_class,
        args=None if args is None else argv,
        parser_kwargs={sub: defaults for sub in _SUBCOMMANDS},
        save_config_kwargs={"overwrite": True},
    )
