"""The recipes' command line: readable errors, path checks before loading, help, and working with a finished run
(evaluate a checkpoint, export it) — on the CPU with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _recipe_fixtures import REPO, last_line, run_lightning, save_tiny_llama
from conftest import DATA_DIR
from jsonargparse import Namespace

from lit_svd import AdapterConfig
from lit_svd.cli import check_paths, error_message, run_recipe
from lit_svd.data import GSM8KDataModule
from lit_svd.launcher import split_script_args

SORSA_YAML = REPO / "recipes" / "configs" / "gsm8k_sorsa.yaml"


# ----- one-line errors ------------------------------------------------------------------------------------------
def test_error_message_takes_our_cause_out_of_jsonargparse_wrapping():
    try:
        try:
            AdapterConfig(method="doesnotexist")
        except ValueError as inner:  # what jsonargparse does with it: a Union error listing the Namespace
            raise ValueError(
                "Does not validate against any of the Union subtypes\nGiven value: Namespace(…)"
            ) from inner
    except ValueError as error:
        message = error_message(error)
    assert message == (
        "invalid AdapterConfig: unknown adapter 'doesnotexist'; choose one of: corda, dora, eva, loftq, lora, "
        "loraga, milora, olora, osora, pissa, sorsa, vera"
    )


def test_error_message_keeps_a_foreign_error_whole_on_one_line():
    try:
        try:
            int("abc")
        except ValueError as inner:
            raise TypeError("Parser key \"data.max_length\":\n  Expected a <class 'int'>. Got value: abc") from inner
    except TypeError as error:
        # no exception of the chain was raised in lit_svd: the outermost one, which names the key
        assert error_message(error) == "Parser key \"data.max_length\": Expected a <class 'int'>. Got value: abc"


# ----- quiet output -----------------------------------------------------------------------------------------------
def test_third_party_noise_is_filtered_and_our_warnings_are_one_line(caplog):
    import logging
    import warnings

    import lit_svd.cli
    from lit_svd.cli import quiet_third_party_output

    quiet_third_party_output()
    quiet_third_party_output()  # idempotent: one filter, one formatter
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use …", FutureWarning, stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated (v6)", FutureWarning, stacklevel=1)
        warnings.warn("a warning we keep", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning we keep"]
    with caplog.at_level(logging.INFO):
        logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        logger.info(
            "💡 Tip: For seamless cloud logging … try installing [litlogger](https://pypi.org/project/litlogger/)"
        )
        logger.info("GPU available: False, used: False")
    assert "litlogger" not in caplog.text and "GPU available" in caplog.text
    with caplog.at_level(logging.WARNING):
        liger = logging.getLogger("liger_kernel.backends.registry")
        message = "Backend impl '%s' for op '%s' could not be imported: %s: %s"
        liger.warning(message, "liger_kernel.ops.backends._ascend.rope", "rope", "ImportError", "no tanh")
        liger.warning(message, "liger_kernel.ops.backends._cutedsl.rope", "rope", "ImportError", "no CuTe DSL")
        liger.warning(message, "liger_kernel.ops.backends._triton.rope", "rope", "ImportError", "broken")
    assert "_ascend" not in caplog.text and "_cutedsl" not in caplog.text and "_triton.rope" in caplog.text
    ours = warnings.formatwarning("863 of 7473 examples are longer", UserWarning, lit_svd.cli.__file__, 1)
    assert ours == "warning: 863 of 7473 examples are longer\n"
    assert warnings.formatwarning("x", UserWarning, "/elsewhere/module.py", 7).startswith("/elsewhere/module.py:7:")


# ----- path checks ------------------------------------------------------------------------------------------------
def _config(data: dict, **top) -> Namespace:
    return Namespace(
        model=Namespace(model="embedded:SmolLM2-135M-Instruct", gguf_file=None, tokenizer=None),
        data=Namespace(**data),
        ckpt_path=top.get("ckpt_path"),
    )


def test_paths_that_exist_pass():
    gsm8k = {"data_dir": str(DATA_DIR / "gsm8k"), "train_file": "train.jsonl", "test_file": "test.jsonl"}
    assert check_paths(_config(gsm8k), "fit") == []
    assert check_paths(_config({"data_dir": None, "train_file": "train.jsonl"}), "fit") == []  # the Hub


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "lit_svd_fsdp"])
def test_a_checkpoint_folder_is_accepted_only_by_fsdp(tmp_path, strategy):
    gsm8k = {"data_dir": str(DATA_DIR / "gsm8k"), "train_file": "train.jsonl", "test_file": "test.jsonl"}
    (tmp_path / "last.ckpt").mkdir()  # AdapterFSDPStrategy's sharded checkpoint is a folder of that name
    config = _config(gsm8k, ckpt_path=str(tmp_path / "last.ckpt"))
    config.trainer = Namespace(strategy=strategy)
    problems = check_paths(config, "fit")
    if "fsdp" in strategy:
        assert problems == []
    else:
        assert problems == [
            f"checkpoint {tmp_path / 'last.ckpt'} is a folder (a sharded checkpoint of --strategy fsdp): resume it "
            "with --strategy fsdp, or pass a .ckpt file (--ckpt_path)"
        ]


def test_missing_files_are_all_named_with_their_flags(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    config = _config(
        {"data_dir": str(tmp_path), "train_file": "train.jsonl", "test_file": "test.jsonl"},
        ckpt_path=str(tmp_path / "none.ckpt"),
    )
    config.model.model = str(tmp_path / "no_model")
    assert check_paths(config, "test") == [
        f"model path does not exist: {tmp_path / 'no_model'} (--model.model)",
        f"checkpoint not found: {tmp_path / 'none.ckpt'} (--ckpt_path)",
        f"data file not found: {tmp_path / 'test.jsonl'} (--data.data_dir, --data.test_file)",
    ]
    # validate/test read no training file, fit does
    (tmp_path / "test.jsonl").write_text("{}\n")
    (tmp_path / "train.jsonl").unlink()
    assert not [p for p in check_paths(config, "test") if "data file" in p]
    assert [p for p in check_paths(config, "fit") if "train.jsonl" in p]


def test_commonsense_on_the_shared_data_says_which_files_exist():
    folder = DATA_DIR / "commonsense"
    problems = check_paths(_config({"data_dir": str(folder), "train_files": None, "tasks": None}), "fit")
    assert problems == [
        f"training file not found: {folder / 'commonsense_170k.json'} (the default training file in "
        "--data.data_dir; train on the task files there with --data.train_files "
        "'[ARC-Challenge/train.json,ARC-Easy/train.json,boolq/train.json,openbookqa/train.json]')",
        f"test file not found for task(s) hellaswag: {folder / 'hellaswag' / 'test.json'} (--data.tasks; with a "
        "test file there: --data.tasks '[boolq,piqa,social_i_qa,winogrande,ARC-Challenge,ARC-Easy,openbookqa]')",
    ]
    # the documented offline command (README, recipe YAML) passes the check
    documented = {
        "data_dir": str(folder),
        "train_files": ["boolq/train.json", "ARC-Challenge/train.json", "ARC-Easy/train.json", "openbookqa/train.json"],
        "tasks": ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa"],
        "test_file": "test.json",
    }
    assert check_paths(_config(documented), "fit") == []


# ----- the launcher ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "launcher", "script"),
    [
        (["r.py", "--data.x", "1"], ["r.py"], ["--data.x", "1"]),
        (["--devices", "2", "r.py", "--help"], ["--devices", "2", "r.py"], ["--help"]),
        (
            ["r.py", "--devices=2", "fit", "--strategy", "ddp", "-h"],
            ["r.py", "--devices=2", "--strategy", "ddp"],
            ["fit", "-h"],
        ),
        (["--help"], ["--help"], []),
    ],
)
def test_split_script_args(args, launcher, script):
    assert split_script_args(args) == (launcher, script)


def test_help_after_the_script_is_the_recipes_help():
    done, _ = run_lightning(["run", "recipes/gsm8k_sorsa.py", "--help"], timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    for option in (
        "--data.data_dir",
        "--model.adapter",
        "--model.learning_rate",
        "--trainer.max_steps",
        "--export.merged_dir",
    ):
        assert option in done.stdout
    assert "export (--ckpt_path CKPT" in done.stdout  # the other subcommands are named
    assert "Fabric object" not in done.stdout


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        (
            "--model.adapter.method",
            "doesnotexist",
            "error: invalid AdapterConfig: unknown adapter 'doesnotexist'; choose one of: corda, dora, eva, loftq, "
            "lora, loraga, milora, olora, osora, pissa, sorsa, vera",
        ),
        ("--data.data_dir", "/nonexistent", "error: data folder not found: /nonexistent (--data.data_dir)"),
        (
            "--model.adapter.base_quantization",
            "nf8",
            "error: invalid AdapterConfig: unknown base_quantization 'nf8'; choose one of: nf4 (or None for a "
            "full-precision base)",
        ),
    ],
)
def test_bad_input_through_lightning_run_ends_with_one_clear_line_before_the_model_loads(flag, value, message):
    done, seconds = run_lightning(["run", "recipes/gsm8k_sorsa.py", flag, value], timeout=120)
    assert done.returncode == 1
    assert last_line(done) == message, done.stdout[-3000:]
    assert "Traceback" not in done.stdout and "ChildFailedError" not in done.stdout
    assert "GGUF" not in done.stdout  # the model never started loading
    assert seconds < 20, f"took {seconds:.1f} s"


def test_export_without_a_target_says_what_to_pass(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {}, "lit_svd": {}}, ckpt)  # readable, so the missing target is the error
    done, _ = run_lightning(["run", "recipes/gsm8k_sorsa.py", "export", "--ckpt_path", str(ckpt)], timeout=120)
    assert done.returncode == 1
    assert last_line(done) == "error: export needs --export.merged_dir DIR and/or --export.peft_dir DIR"


# ----- a finished run: evaluate the checkpoint, export it ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _offline_run_args(tmp_path: Path) -> list[str]:
    """GSM8K from the shared folder, short rows, everything written under ``tmp_path``."""
    return [
        "--data.data_dir", str(DATA_DIR / "gsm8k"),
        "--data.cache_dir", str(tmp_path / "cache"),
        "--data.max_length", "128",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]  # fmt: skip


def _two_tiny_steps(tiny_model: Path) -> list[str]:
    """SORSA r=4 on the tiny Llama, two steps of 4 of 8 examples."""
    return [
        "--model.model", str(tiny_model),
        "--model.adapter.rank", "4",
        "--data.max_train_examples", "8",
        "--data.batch_size", "4",
        "--trainer.max_steps", "2",
    ]  # fmt: skip


def _recipe(args: list[str]) -> dict:
    """Run the GSM8K SORSA recipe in this process; the summary it wrote."""
    cli = run_recipe(GSM8KDataModule, SORSA_YAML, args=args)
    (summary,) = [cb.summary for cb in cli.trainer.callbacks if type(cb).__name__ == "RunSummary"]
    return summary


@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")  # in-process runs under pytest's argv
def test_fit_then_test_and_export_the_checkpoint_from_the_command_line(tiny_model, tmp_path, capsys, caplog):
    common = [
        *_offline_run_args(tmp_path),
        "--data.eval_batch_size", "4",
        "--data.max_eval_examples", "4",
        "--model.max_new_tokens", "4",
    ]  # fmt: skip
    fit = _recipe(
        [
            "fit", *common, *_two_tiny_steps(tiny_model),
            "--model.learning_rate", "1e-2",
            "--trainer.val_check_interval", "2",
            "--trainer.log_every_n_steps", "1",
        ]
    )  # fmt: skip
    run_dir = Path(fit["paths"]["run_dir"])
    config, checkpoint = run_dir / "config.yaml", run_dir / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.ckpt"]  # one file per save
    assert fit["steps"] == 2 and fit["eval"]["val"]["accuracy"]["n"] == 4
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    # the summary ends with the two commands run next in this test
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2].endswith(f"test --config {config} --ckpt_path {checkpoint} --data.max_eval_examples null")
    assert printed[-1].endswith(
        f"export --config {config} --ckpt_path {checkpoint} "
        f"--export.merged_dir {run_dir}/merged --export.peft_dir {run_dir}/peft"
    )

    # evaluate the checkpoint: the model's settings (the tiny model, rank 4) come from the checkpoint
    test = _recipe(["test", "--config", str(config), "--ckpt_path", str(checkpoint), *common])
    assert test["stage"] == "test" and test["paths"]["checkpoint"] == str(checkpoint)
    assert test["eval"]["test"]["accuracy"]["n"] == 4
    # the same 4 questions, the same weights: the test loss is the fit's last validation loss …
    assert test["eval"]["test"]["loss"] == pytest.approx(fit["eval"]["val"]["loss"], rel=1e-5)
    # … and not the untrained model's: test without --ckpt_path scores the base model, and says so
    with caplog.at_level("INFO"):
        base = _recipe(["test", "--config", str(config), *common])
    assert abs(base["eval"]["test"]["loss"] - test["eval"]["test"]["loss"]) > 1e-4
    assert "no --ckpt_path given, so this evaluates the base model" in caplog.text

    # export without retraining; both exports reproduce the trained model's logits
    merged, peft_dir = tmp_path / "merged", tmp_path / "peft"
    export = ["export", "--config", str(config), "--ckpt_path", str(checkpoint)]
    run_recipe(GSM8KDataModule, SORSA_YAML, args=[*export, "--export.merged_dir", str(merged)])
    run_recipe(GSM8KDataModule, SORSA_YAML, args=[*export, "--export.peft_dir", str(peft_dir)])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lit_svd import LitSVDAdapter

    trained = LitSVDAdapter(str(tiny_model), AdapterConfig(method="sorsa", rank=4))
    trained.on_load_checkpoint(torch.load(checkpoint, weights_only=True))
    ids = torch.tensor([[1, 504, 3458, 314, 28, 9]])
    with torch.no_grad():
        expected = trained.model.eval()(ids).logits
        from_merged = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        from_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), peft_dir)
        from_peft = from_peft.eval()(ids).logits
        untrained = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(ids).logits
    assert (expected - untrained).abs().max() > 1e-3  # training changed the model
    torch.testing.assert_close(from_merged, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(from_peft, expected, rtol=0, atol=1e-4)


def test_enable_checkpointing_false_drops_the_recipes_checkpoint_callback():
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from lit_svd.cli import without_checkpoint_callbacks

    listed = [
        Namespace(class_path="lit_svd.callbacks.AdapterCheckpoint", init_args=Namespace()),
        Namespace(class_path="lightning.pytorch.callbacks.LearningRateMonitor", init_args=Namespace()),
        Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace()),
        ModelCheckpoint(),
        LearningRateMonitor(),
        Namespace(class_path="no.such.Callback"),  # left for jsonargparse to name
    ]
    kept = without_checkpoint_callbacks(listed)
    assert [getattr(c, "class_path", type(c).__name__) for c in kept] == [
        "lightning.pytorch.callbacks.LearningRateMonitor",
        "LearningRateMonitor",
        "no.such.Callback",
    ]
    assert without_checkpoint_callbacks(None) is None


@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
def test_fit_with_checkpointing_off_trains_and_writes_no_checkpoint(tiny_model, tmp_path):
    fit = _recipe(
        [
            "fit", *_offline_run_args(tmp_path), *_two_tiny_steps(tiny_model),
            "--trainer.limit_val_batches", "0",
            "--trainer.enable_checkpointing", "false",
        ]
    )  # fmt: skip
    assert fit["steps"] == 2
    assert not fit["paths"].get("checkpoint")
    assert not list(tmp_path.rglob("*.ckpt"))
