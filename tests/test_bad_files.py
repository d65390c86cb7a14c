"""Damaged, foreign and hostile checkpoint files are named and refused before any model loads or training starts."""

from __future__ import annotations

import contextlib
import os

import torch
from jsonargparse import Namespace

from lit_svd.cli import check_paths, checkpoint_problems


class RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _good(path) -> None:
    torch.save({"lit_svd": {"method": "sorsa", "rank": 4}, "state_dict": {"model.x": torch.ones(3)}}, path)


def test_a_good_checkpoint_passes(tmp_path):
    _good(tmp_path / "last.ckpt")
    assert checkpoint_problems(tmp_path / "last.ckpt") == []


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "last.ckpt"
    _good(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy that stopped half-way
    (problem,) = checkpoint_problems(path)
    assert problem.startswith(f"checkpoint {path} cannot be read: truncated or not a torch checkpoint (")


def test_a_checkpoint_of_something_else_is_named(tmp_path):
    torch.save({"state_dict": {"weight": torch.ones(2)}}, tmp_path / "other.ckpt")
    assert checkpoint_problems(tmp_path / "other.ckpt") == [
        f"checkpoint {tmp_path / 'other.ckpt'} was not written by lit_svd (no 'lit_svd' metadata) (--ckpt_path)"
    ]
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    (problem,) = checkpoint_problems(tmp_path / "notes.ckpt")
    assert "cannot be read: truncated or not a torch checkpoint" in problem


def test_a_checkpoint_that_would_run_code_is_refused_unread(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"lit_svd": {}, "payload": RunsCode(marker)}, tmp_path / "evil.ckpt")
    (problem,) = checkpoint_problems(tmp_path / "evil.ckpt")
    assert problem.startswith(f"checkpoint {tmp_path / 'evil.ckpt'} holds more than tensors and plain values")
    assert not marker.exists()  # nothing was executed
    config = Namespace(model=Namespace(model=None), data=None, ckpt_path=str(tmp_path / "evil.ckpt"))
    assert check_paths(config, "fit") == [problem]  # what `lightning run … --ckpt_path` reports, then exits 1
    assert not marker.exists()


def test_a_checkpoint_of_another_method_rank_or_model_is_named():
    import pytest
    from conftest import make_tiny_model

    from lit_svd import AdapterConfig, LitSVDAdapter

    module = LitSVDAdapter(make_tiny_model("llama"), AdapterConfig(method="sorsa", rank=4, target_modules=["q_proj"]))
    saved = {"lit_svd": {"method": "lora", "rank": 8, "model": module.model_name, "version": 1}, "state_dict": {}}
    with pytest.raises(
        ValueError,
        match=r"checkpoint does not match this LitSVDAdapter: method: checkpoint 'lora' vs this module 'sorsa'; "
        r"rank: checkpoint 8 vs this module 4$",
    ):
        module.on_load_checkpoint(saved)


# ----- write failures ----------------------------------------------------------------------------------------------
def _fit_until_the_step_4_checkpoint_fails(tmp_path, checkpoint_class, reason: str):
    """Fit SORSA on a tiny model with ``checkpoint_class`` (an ``AdapterCheckpoint``) saving every 2 steps into
    ``tmp_path/ckpt``; expects the step-4 write to fail for ``reason``. Returns ``(module, the OSError)``."""
    import pytest
    from conftest import make_tiny_model
    from lightning_helpers import RandomTokensData, quiet_cpu_trainer

    from lit_svd import AdapterConfig, LitSVDAdapter, SVDInit

    module = LitSVDAdapter(make_tiny_model("llama"), AdapterConfig(method="sorsa", rank=2, target_modules=["q_proj"]))
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    trainer = quiet_cpu_trainer(
        tmp_path,
        6,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[SVDInit(), checkpoint_class(every_n_train_steps=2, dirpath=tmp_path / "ckpt")],
    )
    with pytest.raises(
        OSError,
        match=rf"writing the checkpoint of step 4 to {checkpoint} failed \({reason}\); "
        rf"the previous {checkpoint} is intact",
    ) as raised:
        trainer.fit(module, datamodule=RandomTokensData(count=16, batch_size=2))
    return module, raised.value


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from fsspec.implementations.local import LocalFileOpener

    from lit_svd.callbacks import AdapterCheckpoint

    write = LocalFileOpener.write
    saves = []

    def fills_the_disk(opener, data):  # the second checkpoint's write fails half-way
        if len(saves) == 2:
            write(opener, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(opener, data)

    class CountSaves(AdapterCheckpoint):
        def _save_checkpoint(self, trainer, filepath):
            saves.append(trainer.global_step)
            super()._save_checkpoint(trainer, filepath)

    monkeypatch.setattr(LocalFileOpener, "write", fills_the_disk)
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    _, error = _fit_until_the_step_4_checkpoint_fails(tmp_path, CountSaves, "No space left on device")
    assert error.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2  # the last good one, whole
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.ckpt"]  # no half-written file left


def test_a_failed_export_leaves_the_previous_export_as_it_was(tmp_path, monkeypatch):
    import errno

    import pytest
    from conftest import make_tiny_model

    from lit_svd import AdapterConfig, initialize_adapters, inject_adapters
    from lit_svd.export import export_peft_lora

    model = make_tiny_model("llama")
    inject_adapters(model, AdapterConfig(method="sorsa", rank=2, target_modules=["q_proj"]))
    initialize_adapters(model)
    target = tmp_path / "peft"
    export_peft_lora(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(
        OSError, match=rf"writing the export to {target} failed \(No space left on device\); {target} is unchanged"
    ):
        export_peft_lora(model, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]  # no staging folder left behind


@contextlib.contextmanager
def _file_size_limit():
    """Yield ``limit(n)``: from then on the kernel refuses to grow any file of this process past n bytes.

    A real write failure without a small file system (mounting one needs root): past ``RLIMIT_FSIZE`` a
    write(2) fails with EFBIG once SIGXFSZ, whose default action would kill the process, is ignored. The
    soft limit is restored afterwards (an unprivileged process may raise it back up to the hard limit).
    """
    import resource
    import signal

    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield lambda size: resource.setrlimit(resource.RLIMIT_FSIZE, (size, before[1]))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_write_the_kernel_refuses_keeps_the_previous_checkpoint_and_export(tmp_path):
    import errno

    import pytest

    from lit_svd.callbacks import AdapterCheckpoint

    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    with _file_size_limit() as limit:

        class LimitAfterFirstSave(AdapterCheckpoint):
            def _save_checkpoint(self, trainer, filepath):
                super()._save_checkpoint(trainer, filepath)
                limit(checkpoint.stat().st_size // 2)  # the next checkpoint stops half-way

        module, error = _fit_until_the_step_4_checkpoint_fails(tmp_path, LimitAfterFirstSave, "File too large")
        assert error.errno == errno.EFBIG

        target = tmp_path / "peft"
        limit(2**30)
        module.export_peft_lora(target)
        before = {p.name: p.read_bytes() for p in target.iterdir()}
        limit(max(len(data) for data in before.values()) // 2)
        with pytest.raises(
            OSError, match=rf"writing the export to {target} failed \(File too large\); {target} is unchanged"
        ):
            module.export_peft_lora(target, overwrite=True)
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2  # the last good one, whole
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.ckpt"]  # no half-written file left
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "peft"]  # no staging folder left behind


# ----- adapter state dicts and model folders -------------------------------------------------------------------
def test_adapter_tensors_of_the_wrong_kind_or_with_nans_are_named_before_anything_loads():
    import pytest
    from conftest import make_tiny_model

    from lit_svd import AdapterConfig, inject_adapters
    from lit_svd.inject import adapter_state_dict, initialize_adapters, load_adapter_state_dict

    source = make_tiny_model("llama")
    inject_adapters(source, AdapterConfig(method="lora", rank=2, target_modules=["q_proj"]))
    initialize_adapters(source)
    state = adapter_state_dict(source)
    key_a, key_b = sorted(k for k in state if k.endswith((".A", ".B")))[:2]
    bad = dict(state) | {key_a: state[key_a].long(), key_b: torch.full_like(state[key_b], float("nan"))}
    target = make_tiny_model("llama")
    inject_adapters(target, AdapterConfig(method="lora", rank=2, target_modules=["q_proj"]), initialize=False)
    before = {k: v.clone() for k, v in adapter_state_dict(target).items()}
    with pytest.raises(ValueError) as raised:
        load_adapter_state_dict(target, bad)
    message = str(raised.value)
    assert f"dtype mismatch for '{key_a}': checkpoint torch.int64 vs model torch.float32" in message
    assert f"non-finite values in '{key_b}'" in message
    for key, value in adapter_state_dict(target).items():  # nothing was written
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_a_model_folder_that_is_not_a_causal_lm_is_named(tmp_path):
    import pytest
    from transformers import DistilBertConfig, DistilBertModel

    from lit_svd.models import load_causal_lm

    with pytest.raises(ValueError, match=rf"{tmp_path} has no config.json: not a Hugging Face model folder"):
        load_causal_lm(str(tmp_path))
    config = DistilBertConfig(dim=8, n_layers=1, n_heads=2, hidden_dim=8)  # an encoder, with no causal-LM head
    DistilBertModel(config).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match=r"holds a 'distilbert' model, which is not a causal language model"):
        load_causal_lm(str(tmp_path / "encoder"))
