"""LightningCLI glue for the recipes: YAML defaults, ``lightning run`` settings, checks, exports, summary.

A recipe is ``run_recipe(GSM8KDataModule, "recipes/configs/gsm8k_sorsa.yaml")``. With no subcommand the
recipe fits; ``--config`` files and ``--key value`` flags override the recipe's YAML. Launched through
``lightning run --devices N --strategy ddp …`` the launcher's choices (``LT_*`` environment variables, as
``fabric run`` sets them) become the Trainer's defaults.

Subcommands: ``fit`` (default), ``validate``, ``test``, ``predict`` (LightningCLI's; with ``--ckpt_path``
the model's settings come from the checkpoint) and ``export`` (ours: ``--ckpt_path`` + ``--export.merged_dir``
and/or ``--export.peft_dir``, no training). Paths given on the command line are checked before the model
loads, and a failing recipe ends with one line ``error: <message>`` (``LIT_SVD_TRACEBACK=1`` shows the
traceback instead).
"""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_svd.callbacks.run_summary import RunSummary
from lit_svd.module import LitSVDAdapter
from lit_svd.strategies import AdapterFSDPStrategy  # noqa: F401  (registers 'lit_svd_ddp', 'lit_svd_fsdp')

__all__ = [
    "LitSVDCLI",
    "check_paths",
    "error_message",
    "launcher_trainer_overrides",
    "quiet_third_party_output",
    "run_recipe",
]

_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_EXPORT = "export"
# Lightning's special ckpt_path values, which are not files.
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
TRACEBACK_ENV = "LIT_SVD_TRACEBACK"
"""Set to ``1`` to get Python's traceback instead of the one-line ``error:`` of a failing recipe."""


# ----- quiet output -----------------------------------------------------------------------------------------
class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_third_party_output() -> None:
    """Silence third-party messages that a recipe's user can do nothing about (our entry points only).

    - torch's ``LeafSpec`` deprecation, raised from inside Lightning's ``_pytree`` helper;
    - transformers' ``is_gradient_checkpointing`` deprecation, raised when Lightning inspects the model;
    - Lightning's tip to install ``litlogger`` (an advertisement, printed by every Trainer), and its note that
      a ``ModelSummary`` callback (our ``ParameterSummary``) replaces the default one;
    - Liger's notes (0.8.5: four per process at the first step) that its optional backends for other hardware
      (Ascend NPUs, CuTe DSL) could not be imported; its Triton kernels, the ones ``liger_kernels`` uses, run.

    Our own warnings print as one line, ``warning: <message>``, without the file name and source line.
    The library itself never filters or reformats warnings: code that imports ``lit_svd`` sees everything.
    """
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    if not getattr(warnings.formatwarning, "_lit_svd", False):
        warnings.formatwarning = _one_line_for_ours(warnings.formatwarning)
    # Lightning's note that our ParameterSummary replaces its default summary (the YAML asks for it).
    lightning_notes = _DropMessages("litlogger", "Skipping setting a default `ModelSummary`")
    drops = {
        "lightning.pytorch.utilities.rank_zero": lightning_notes,
        "lightning.fabric.utilities.rank_zero": lightning_notes,
        "liger_kernel.backends.registry": _DropMessages(
            "liger_kernel.ops.backends._ascend.", "liger_kernel.ops.backends._cutedsl."
        ),
    }
    for name, drop in drops.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):  # idempotent
            logger.addFilter(drop)


def _one_line_for_ours(default: Any) -> Any:
    def format_warning(message, category, filename, lineno, line=None) -> str:
        if Path(filename).resolve().is_relative_to(_PACKAGE_DIR):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    format_warning._lit_svd = True
    return format_warning


# ----- errors ------------------------------------------------------------------------------------------------
def error_message(error: BaseException) -> str:
    """One line for ``error``: the most telling message of its chain of causes, multi-line lists joined.

    jsonargparse wraps our ``ValueError`` ("invalid AdapterConfig: …") in its own ("Does not validate against
    any of the Union subtypes …", listing the whole Namespace): when an exception in the chain was raised by
    lit_svd's own code, the innermost such one is the message; otherwise the outermost (e.g. jsonargparse's
    'Parser key "data.max_length": Expected a <class 'int'>', which names the key).
    """
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 32:
        chain.append(chain[-1].__cause__)
    ours = [e for e in chain if _raised_in_lit_svd(e)]
    chosen = ours[-1] if ours else error
    lines = [line.strip().removeprefix("- ").strip() for line in str(chosen).splitlines() if line.strip()]
    if not lines:
        return type(chosen).__name__
    head, *items = lines
    if not items:
        return head
    return head + (" " if head.endswith(":") else "; ") + "; ".join(items)


def _raised_in_lit_svd(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE_DIR)


_PACKAGE_DIR = Path(__file__).resolve().parent


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that mean "your input is wrong": their message is the whole story, no traceback needed."""
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return (ValueError, TypeError, OSError, ArgumentError, MisconfigurationException)


def _fail(error: BaseException) -> NoReturn:
    """Print the error as the last line of output (after a traceback for unexpected errors) and exit 1."""
    message = error_message(error)
    if not isinstance(error, _user_error_types()):
        traceback.print_exception(error)
        message = f"{type(error).__name__}: {message}"
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


# ----- launcher settings -------------------------------------------------------------------------------------
# What the plain names mean for a recipe (lit_svd.strategies): DDP without the per-step broadcast of the
# adapters' buffers, and FSDP2 sharding after the adapters are initialised on full weights.
RECIPE_STRATEGIES = {"ddp": "lit_svd_ddp", "fsdp": "lit_svd_fsdp"}


def recipe_strategy(strategy: Any) -> Any:
    """``strategy`` as a recipe runs it: ``"ddp"``/``"fsdp"`` become lit_svd's strategies, the rest stays."""
    if not isinstance(strategy, str):
        return strategy
    if strategy.startswith("fsdp") and strategy != "fsdp":
        raise ValueError(
            f"--strategy {strategy} is Lightning's FSDP1 variant, which lit_svd does not support; "
            "--strategy fsdp gives lit_svd's FSDP2 (docs/distributed.md)"
        )
    return RECIPE_STRATEGIES.get(strategy, strategy)


def launcher_trainer_overrides(environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """Trainer settings chosen on the ``lightning run`` / ``fabric run`` command line (``LT_*`` variables)."""
    env = os.environ if environ is None else environ
    if env.get("LT_CLI_USED") != "1":
        return {}
    overrides: dict[str, object] = {}
    if "LT_ACCELERATOR" in env:
        overrides["accelerator"] = env["LT_ACCELERATOR"]
    if "LT_STRATEGY" in env:
        overrides["strategy"] = recipe_strategy(env["LT_STRATEGY"])
    if "LT_DEVICES" in env:
        devices = env["LT_DEVICES"]
        overrides["devices"] = int(devices) if devices.isdigit() else devices
    if "LT_NUM_NODES" in env:
        overrides["num_nodes"] = int(env["LT_NUM_NODES"])
    if "LT_PRECISION" in env:
        overrides["precision"] = env["LT_PRECISION"]
    return overrides


# ----- path checks -------------------------------------------------------------------------------------------
def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a jsonargparse ``Namespace`` or a dict (``default`` when missing)."""
    if config is None:
        return default
    try:
        return config[key] if key in config else default
    except TypeError:
        return getattr(config, key, default)


def _resolve(data_dir: str | None, file: str) -> Path:
    path = Path(file).expanduser()
    return path if path.is_absolute() or data_dir is None else Path(data_dir).expanduser() / path


def _data_problems(data: Any, stage: str) -> list[str]:
    """Missing local data inputs of a recipe's datamodule config, one sentence each (names the flag)."""
    from lit_svd.eval.answers import COMMONSENSE_TASKS

    problems = []
    trains = stage == "fit"
    # fit validates on the evaluation set unless val_size holds out training examples
    evaluates = stage != "fit" or not _get(data, "val_size", 0)
    data_dir = _get(data, "data_dir")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        return [f"data folder not found: {data_dir} (--data.data_dir)"]
    commonsense = "tasks" in data if hasattr(data, "__contains__") else False
    if commonsense:
        folder = Path(data_dir).expanduser() if data_dir is not None else None
        train_files = _get(data, "train_files")
        if trains and (train_files is not None or folder is not None):
            for file in train_files or ["commonsense_170k.json"]:
                path = _resolve(data_dir, file)
                if not path.is_file():
                    hint = "--data.train_files"
                    if train_files is None and folder is not None:
                        found = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/train.json"))
                        hint = (
                            "the default training file in --data.data_dir; train on the task files there with "
                            f"--data.train_files '[{','.join(found)}]'"
                            if found
                            else "the default training file in --data.data_dir"
                        )
                    problems.append(f"training file not found: {path} ({hint})")
        if evaluates and folder is not None:
            tasks = _get(data, "tasks") or list(COMMONSENSE_TASKS)
            test_file = _get(data, "test_file", "test.json")
            missing = [task for task in tasks if not (folder / task / test_file).is_file()]
            if missing:
                present = [task for task in tasks if task not in missing]
                problems.append(
                    f"test file not found for task(s) {', '.join(missing)}: "
                    f"{folder / missing[0] / test_file} (--data.tasks; "
                    + (f"with a test file there: --data.tasks '[{','.join(present)}]')" if present else "none has one)")
                )
        return problems
    if data_dir is not None:
        for key, needed in (("train_file", trains), ("test_file", evaluates)):
            file = _get(data, key)
            if needed and file and not _resolve(data_dir, file).is_file():
                problems.append(f"data file not found: {_resolve(data_dir, file)} (--data.data_dir, --data.{key})")
    for key in ("gsm8k_dir", "math_dir"):
        folder = _get(data, key)
        if folder is not None and evaluates and not (Path(folder).expanduser() / "test.jsonl").is_file():
            problems.append(f"evaluation file not found: {Path(folder).expanduser() / 'test.jsonl'} (--data.{key})")
    return problems


def check_paths(config: Any, stage: str) -> list[str]:
    """Every missing input path of a parsed recipe config, before anything is loaded.

    Checks the model (and tokenizer) path when it is local, ``ckpt_path``, and the datamodule's local
    files that ``stage`` will read. Hub ids cannot be checked offline and pass.

    Args:
        config: The parsed config of one subcommand (``model``, ``data``, ``ckpt_path`` …).
        stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``"export"``.

    Returns:
        One message per problem, naming the path and the flag that sets it; empty when all exist.
    """
    from lit_svd.models import resolve_model

    problems = []
    model = _get(config, "model")
    for key, gguf_key in (("model", "gguf_file"), ("tokenizer", None)):
        name = _get(model, key)
        if isinstance(name, str):
            try:
                resolve_model(name, _get(model, gguf_key) if gguf_key else None)
            except FileNotFoundError as error:
                problems.append(f"{error} (--model.{key})")
    ckpt_path = _get(config, "ckpt_path")
    if ckpt_path is not None and str(ckpt_path) not in _CKPT_KEYWORDS and not str(ckpt_path).startswith("registry:"):
        path = Path(ckpt_path).expanduser()
        strategy = str(_get(_get(config, "trainer"), "strategy", "") or "")
        if not path.exists():
            problems.append(f"checkpoint not found: {ckpt_path} (--ckpt_path)")
        elif path.is_dir() and "fsdp" not in strategy.lower():
            # AdapterFSDPStrategy writes a folder of shards; every other strategy a single file.
            problems.append(
                f"checkpoint {ckpt_path} is a folder (a sharded checkpoint of --strategy fsdp): resume it with "
                "--strategy fsdp, or pass a .ckpt file (--ckpt_path)"
            )
        elif path.is_file():
            problems += checkpoint_problems(path)
    data = _get(config, "data")
    if data is not None and stage != _EXPORT:
        problems += _data_problems(data, stage)
    return problems


def checkpoint_problems(path: Path) -> list[str]:
    """Why the checkpoint file at ``path`` cannot be resumed from or evaluated (empty: it can).

    Read as Lightning will (``weights_only=True``: tensors and plain values only, so a file that would run
    code when unpickled is refused), memory-mapped, so that even a large checkpoint costs little: a
    truncated or foreign file is named before any model is loaded or any training starts.
    """
    import pickle

    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0][:200]
        return [f"checkpoint {path} holds more than tensors and plain values; refused unread ({reason}) (--ckpt_path)"]
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError/EOFError/… for damaged files
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return [f"checkpoint {path} cannot be read: truncated or not a torch checkpoint ({reason}) (--ckpt_path)"]
    if not isinstance(checkpoint, dict) or "lit_svd" not in checkpoint:
        return [f"checkpoint {path} was not written by lit_svd (no 'lit_svd' metadata) (--ckpt_path)"]
    return []


# ----- the CLI -----------------------------------------------------------------------------------------------
def without_checkpoint_callbacks(callbacks: list[Any] | None) -> list[Any] | None:
    """``callbacks`` (a parsed ``--trainer.callbacks`` list) less every ``ModelCheckpoint`` subclass.

    The recipes' YAMLs list ``AdapterCheckpoint``, and Lightning refuses a checkpoint callback beside
    ``enable_checkpointing=False``; ``--trainer.enable_checkpointing false`` should just turn saving off.
    """
    if not callbacks:
        return callbacks

    def is_checkpoint(callback: Any) -> bool:
        if isinstance(callback, ModelCheckpoint):
            return True
        class_path = _get(callback, "class_path")
        if not isinstance(class_path, str) or "." not in class_path:
            return False
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return False  # jsonargparse names the bad class path itself when it instantiates it
        return isinstance(cls, type) and issubclass(cls, ModelCheckpoint)

    return [callback for callback in callbacks if not is_checkpoint(callback)]


class LitSVDCLI(LightningCLI):
    """LightningCLI for ``LitSVDAdapter``: path checks, ``--export.*`` after fit, and the run summary.

    Args:
        *args: ``LightningCLI``'s arguments.
        recipe: The recipe script, for the commands the summary suggests (default: ``sys.argv[0]``).
        **kwargs: ``LightningCLI``'s keyword arguments.
    """

    def __init__(self, *args: Any, recipe: str | None = None, **kwargs: Any) -> None:
        self.recipe = recipe if recipe is not None else sys.argv[0]
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--export.merged_dir", type=str | None, default=None, help="write a merged HF model here after fit"
        )
        parser.add_argument(
            "--export.peft_dir", type=str | None, default=None, help="write a PEFT LoRA adapter here after fit"
        )

    def _subcommand_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        overrides = launcher_trainer_overrides()
        for key, value in overrides.items():
            config.trainer[key] = value
        if "strategy" in config.trainer:  # `--trainer.strategy ddp` as well as `lightning run --strategy ddp`
            config.trainer["strategy"] = recipe_strategy(config.trainer["strategy"])
        if config.trainer.get("enable_checkpointing") is False:
            config.trainer["callbacks"] = without_checkpoint_callbacks(config.trainer.get("callbacks"))
        problems = check_paths(config, self.subcommand or _EXPORT)
        if problems:
            raise FileNotFoundError("; ".join(problems))

    def after_instantiate_classes(self) -> None:
        # The summary prints after our own after_<subcommand> work (exports), so that it lists them.
        for callback in self._summaries():
            callback.defer = True

    def _summaries(self) -> list[RunSummary]:
        trainer = getattr(self, "trainer", None)
        return [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, RunSummary)]

    def _command(self, *args: str) -> str:
        return shlex.join(["lightning", "run", _display_path(self.recipe), *args])

    def _next_commands(self, summary_paths: Mapping[str, Any]) -> list[str]:
        """Evaluate the checkpoint on the whole test set, and export it: the two things to do after fit."""
        checkpoint = summary_paths.get("checkpoint")
        if not checkpoint:
            return []
        config = summary_paths.get("config")
        common = [*(["--config", _display_path(config)] if config else []), "--ckpt_path", _display_path(checkpoint)]
        run_dir = _display_path(summary_paths["run_dir"])
        return [
            self._command("test", *common, "--data.max_eval_examples", "null"),
            self._command(
                _EXPORT, *common, "--export.merged_dir", f"{run_dir}/merged", "--export.peft_dir", f"{run_dir}/peft"
            ),
        ]

    def _finish(self, exports: dict[str, str] | None = None, seconds: dict[str, float] | None = None) -> None:
        for callback in self._summaries():
            paths = callback.collect(self.trainer)["paths"]
            extra: dict[str, Any] = {}
            ckpt_path = self._subcommand_config().get("ckpt_path")
            if self.subcommand != "fit" and ckpt_path:
                extra["checkpoint"] = str(ckpt_path)
            commands = self._next_commands(paths) if self.subcommand == "fit" else []
            callback.finish(self.trainer, paths=extra, exports=exports, commands=commands, seconds=seconds)

    def _export(self, export: Mapping[str, Any]) -> dict[str, str]:
        """Write the exports asked for (``--export.merged_dir``, ``--export.peft_dir``); label → folder.

        Every rank calls it (under FSDP the adapter is gathered from all ranks); rank 0 writes and gets the
        paths, the others an empty dict.
        """
        exports = {}
        if export.get("merged_dir"):
            path = self.model.export_merged(export["merged_dir"], overwrite=True)
            if path is not None:
                exports["merged model"] = str(path)
        if export.get("peft_dir"):
            path = self.model.export_peft_lora(export["peft_dir"], overwrite=True)
            if path is not None:
                exports["PEFT LoRA adapter"] = str(path)
        return exports

    def after_fit(self) -> None:
        started = time.perf_counter()
        export = self.config[self.subcommand].get("export") or {}
        with self.model.export_placement():  # both exports on the accelerator, the model moved there once
            exports = self._export(export)
        seconds = (
            {"export": time.perf_counter() - started} if export.get("merged_dir") or export.get("peft_dir") else None
        )
        self._finish(exports, seconds)

    def _before_evaluation(self) -> None:
        _quiet_checkpoint_restore()
        if self._subcommand_config().get("ckpt_path") is None:
            # Uninitialised adapters add exactly zero (every method): this scores the untrained base model.
            rank_zero_info(
                f"{self.subcommand}: no --ckpt_path given, so this evaluates the base model "
                "(pass --ckpt_path RUN/checkpoints/last.ckpt to evaluate a trained adapter)"
            )

    def before_validate(self) -> None:
        self._before_evaluation()

    def before_test(self) -> None:
        self._before_evaluation()

    def after_validate(self) -> None:
        self._finish()

    def after_test(self) -> None:
        self._finish()


class _ExportCLI(LitSVDCLI):
    """``RECIPE export --ckpt_path CKPT --export.merged_dir D [--export.peft_dir P]``: no Trainer, no training.

    The model's settings (base model, method, rank …) come from the checkpoint's hyper-parameters, as
    LightningCLI does for ``test --ckpt_path``; the adapter tensors are loaded with the module's own
    ``on_load_checkpoint`` (residual base weights rebuilt from the original model).
    """

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--ckpt_path", type=str, required=True, help="adapter checkpoint of a finished run (.../last.ckpt)"
        )
        # A run's saved config.yaml (fit's) has this key; accept it so that --config RUN/config.yaml works.
        parser.add_argument("--weights_only", type=bool | None, default=None, help="ignored: loads weights only")

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        export = self.config.get("export") or {}
        if not (export.get("merged_dir") or export.get("peft_dir")):
            raise ValueError("export needs --export.merged_dir DIR and/or --export.peft_dir DIR")
        import torch

        hparams = torch.load(self.config.ckpt_path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
        # The checkpoint's own settings win (as with LightningCLI's `test --ckpt_path`). They are plain values
        # saved by this same class, so they are set key by key (jsonargparse's parse_object would turn the
        # already-parsed adapter dataclass into a class_path form that no longer validates).
        model = self.config.model
        for key, value in hparams.items():
            if isinstance(value, dict) and isinstance(model.get(key), Namespace):
                for inner, inner_value in value.items():
                    if inner in model[key]:
                        model[key][inner] = inner_value
            elif key in model:
                model[key] = value

    def instantiate_classes(self) -> None:
        # Only the model is needed: no Trainer (and none of its start-up messages).
        self.config_init = self.parser.instantiate_classes(self.config)
        self.model = self.config_init["model"]
        self.datamodule = self.config_init.get("data")

    def after_instantiate_classes(self) -> None:
        import torch

        checkpoint = torch.load(self.config.ckpt_path, map_location="cpu", weights_only=True)
        self.model.on_load_checkpoint(checkpoint)
        export = self.config["export"]
        import torch

        # No trainer here: the accelerator, when there is one, merges in seconds what the host takes minutes for.
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        with self.model.export_placement(device):
            exports = self._export(export)
        for label, path in exports.items():
            rank_zero_info(f"{label} written to {path}")
            loader = "AutoModelForCausalLM.from_pretrained" if label == "merged model" else "PeftModel.from_pretrained"
            argument = repr(path) if label == "merged model" else f"base_model, {path!r}"
            rank_zero_info(f"  load it: {loader}({argument})")


def _quiet_checkpoint_restore() -> None:
    # Evaluating a checkpoint restores ModelCheckpoint's state into the new run folder, and Lightning warns
    # that the folder changed; for an evaluation that is expected, not a problem.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")


def _display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it (shorter commands to copy)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


_FIT_DESCRIPTION = (
    "Train (the default subcommand). Other subcommands: validate, test, predict (with --ckpt_path CKPT: "
    "evaluate a finished run), export (--ckpt_path CKPT --export.merged_dir DIR / --export.peft_dir DIR). "
    "Run 'RECIPE SUBCOMMAND --help' for their options."
)
_EXPORT_DESCRIPTION = (
    "Export a finished run's adapter checkpoint without training: --ckpt_path CKPT and --export.merged_dir DIR "
    "(a merged Hugging Face model) and/or --export.peft_dir DIR (a PEFT LoRA adapter). The model's settings come "
    "from the checkpoint."
)


def run_recipe(
    datamodule_class: type, config_file: str | os.PathLike, args: list[str] | None = None
) -> LitSVDCLI | None:
    """Run a recipe: ``fit`` unless another subcommand is given, with ``config_file`` as YAML defaults.

    Args:
        datamodule_class: The recipe's ``LightningDataModule``.
        config_file: The recipe's YAML (defaults for every subcommand).
        args: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The finished ``LitSVDCLI``. Errors end the process with exit status 1 and one line
        ``error: <message>`` on stderr (set ``LIT_SVD_TRACEBACK=1`` to raise them instead).
    """
    quiet_third_party_output()
    try:
        return _run_recipe(datamodule_class, config_file, args)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as error:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        _fail(error)


def _run_recipe(datamodule_class: type, config_file: str | os.PathLike, args: list[str] | None) -> LitSVDCLI:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] in (["-h"], ["--help"]):
        argv = ["fit", *argv]  # the options of the default subcommand, which is what a bare run does
    elif not argv or argv[0] not in (*_SUBCOMMANDS, _EXPORT):
        argv = ["fit", *argv]
    config_file = Path(config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"recipe config not found: {config_file}")
    # recipes/configs/NAME.yaml belongs to recipes/NAME.py: the script the summary's commands run
    script = config_file.parent.parent / f"{config_file.stem}.py"
    recipe = str(script) if script.is_file() else sys.argv[0]
    # exit_on_error=False: a bad flag raises (one line) instead of printing the 60-line usage.
    defaults = {"default_config_files": [str(config_file)], "exit_on_error": False}
    subcommand, rest = argv[0], argv[1:]
    if args is None:  # LightningCLI reads sys.argv itself (and warns when both are given)
        sys.argv[1:] = rest if subcommand == _EXPORT else argv
    if subcommand == _EXPORT:
        return _ExportCLI(
            LitSVDAdapter,
            datamodule_class,
            args=None if args is None else rest,
            run=False,
            recipe=recipe,
            parser_kwargs={**defaults, "description": _EXPORT_DESCRIPTION},
        )
    parser_kwargs: dict[str, Any] = {"exit_on_error": False} | {sub: dict(defaults) for sub in _SUBCOMMANDS}
    parser_kwargs["fit"]["description"] = _FIT_DESCRIPTION
    return LitSVDCLI(
        LitSVDAdapter,
        datamodule_class,
        args=None if args is None else argv,
        recipe=recipe,
        parser_kwargs=parser_kwargs,
        save_config_kwargs={"overwrite": True},
    )
