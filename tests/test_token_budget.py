"""Token-budget batches (``max_tokens_per_batch``): packed rows of at most the budget, on any number of ranks,
resumable by whole batches, one optimizer step each."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from faults import EXAMPLES, KillAt, Killed, NumberedExamples  # 24 numbered training examples of 4 to 11 tokens
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import quiet_cpu_trainer

from lit_svd import AdapterConfig, GSM8KDataModule, LitSVDAdapter, SVDInit
from lit_svd.callbacks import AdapterCheckpoint
from lit_svd.data import LengthGroupedSampler, ResumableDataLoader, TokenBudgetSampler
from lit_svd.data.base import packed_row_length
from lit_svd.inject import adapter_state_dict

MAX_LENGTH = 16


def numbers(batch: dict) -> list[int]:
    """The example numbers (first tokens) of a packed batch's sequences, its padding sequence left out."""
    starts = batch["cu_seq_lens"][:-1].tolist()
    if batch["padding_tokens"]:
        starts = starts[:-1]
    return batch["input_ids"][0, starts].tolist()


def numbered(seed: int = 7, **kwargs) -> NumberedExamples:
    data = NumberedExamples(max_length=MAX_LENGTH, pack_sequences=True, seed=seed, **kwargs)
    data.setup("fit")
    return data


def lengths_by_number(data: NumberedExamples) -> dict[int, int]:
    return {row["input_ids"][0]: row["length"] for row in data.train_dataset}


def random_lengths(count: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 65, count)


# ----- one rank: rows within the budget, maximal batches, every example once ---------------------------------------
@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize(("budget", "multiple"), [(26, None), (40, None), (48, 8), (32, 16)])
def test_packed_rows_stay_within_the_budget_and_batches_are_maximal(budget, multiple, group_by_length):
    data = numbered(max_tokens_per_batch=budget, pack_to_multiple_of=multiple, group_by_length=group_by_length)
    lengths = lengths_by_number(data)
    loader = data.train_dataloader()
    assert loader.batch_size is None and isinstance(loader.sampler, TokenBudgetSampler)
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen = [numbers(batch) for batch in batches]
        assert sorted(n for these in seen for n in these) == list(range(1, EXAMPLES + 1))  # each once
        for batch, these in zip(batches, seen, strict=True):
            tokens = sum(lengths[n] for n in these)
            # The collator's row: the batch's tokens, rounded up with at least one padding token.
            assert batch["input_ids"].shape[1] == packed_row_length(tokens, multiple) <= budget
            assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape
            assert "scored_positions" in batch and batch["cu_seq_lens"][-1] == batch["input_ids"].shape[1]


@pytest.mark.parametrize(("budget", "multiple"), [(256, None), (128, 16), (65, None), (80, 16)])
def test_batches_are_the_seeds_maximal_stretches_served_in_another_order_each_epoch(budget, multiple):
    lengths = random_lengths()
    sampler = TokenBudgetSampler(lengths, budget, multiple, seed=5)
    packed = sampler.batches
    assert [i for batch in packed for i in batch] == sampler._epoch_order().tolist()  # consecutive stretches
    assert max(packed_row_length(int(lengths[batch].sum()), multiple) for batch in packed) <= budget
    for batch, following in zip(packed, packed[1:], strict=False):  # the next example would not have fit
        assert packed_row_length(int(lengths[batch].sum() + lengths[following[0]]), multiple) > budget
    epochs = []
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
        assert len(epochs[-1]) == len(sampler) == len(packed)  # every epoch as long: Lightning reads len once
        assert sorted(map(tuple, epochs[-1])) == sorted(map(tuple, packed))  # the same batches, each once
    assert epochs[0] != epochs[1] != epochs[2]  # in another order each epoch
    twin = TokenBudgetSampler(lengths, budget, multiple, seed=5)
    twin.set_epoch(1)
    assert list(twin) == epochs[1]  # same seed and epoch: the same batches in the same order
    other = TokenBudgetSampler(lengths, budget, multiple, seed=6)
    assert other.batches != packed and sorted(i for batch in other.batches for i in batch) == list(range(300))


# ----- two ranks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("budget", "count"), [(128, 99), (120, 108)])  # odd: one batch repeats; even
@pytest.mark.parametrize("epoch", [0, 1])
def test_two_ranks_get_as_many_batches_and_share_the_epoch_out(epoch, budget, count):
    lengths = random_lengths()
    ranks = [
        TokenBudgetSampler(lengths, budget, num_replicas=2, rank=rank, seed=5, group_by_length=False) for rank in (0, 1)
    ]
    for sampler in ranks:
        sampler.set_epoch(epoch)
    batches = ranks[0].epoch_batches()
    assert ranks[1].epoch_batches() == batches  # every rank forms the same batches in the same order
    whole = TokenBudgetSampler(lengths, budget, seed=5, group_by_length=False)
    whole.set_epoch(epoch)
    assert whole.epoch_batches() == batches  # ...those of one process (with group_by_length, mega-batches
    # span all ranks' batches and so depend on num_replicas, as LengthGroupedSampler's do)
    assert len(batches) == count
    mine = [list(sampler) for sampler in ranks]
    per_rank = -(-len(batches) // 2)
    assert len(mine[0]) == len(mine[1]) == len(ranks[0]) == len(ranks[1]) == per_rank  # DDP would hang otherwise
    assert mine[0] == batches[0::2]
    # An odd count: rank 1's last batch is the epoch's first again (the documented repetition).
    assert mine[1] == batches[1::2] + ([batches[0]] if len(batches) % 2 else [])
    examples = [[i for batch in rank for i in batch] for rank in mine]
    assert sorted(set(examples[0]) | set(examples[1])) == list(range(len(lengths)))
    assert sorted(set(examples[0]) & set(examples[1])) == (sorted(batches[0]) if len(batches) % 2 else [])

    # Resumed after 5 batches, each rank goes on with its own 6th.
    ranks[1].resume_at(epoch, 5)
    assert list(ranks[1]) == mine[1][5:]


def test_more_ranks_than_batches_repeat_the_epochs_batches():
    sampler = TokenBudgetSampler([10] * 4, 20, num_replicas=3, rank=2, seed=0)  # 2 batches for 3 ranks
    assert list(sampler) == [sampler.epoch_batches()[0]] and len(sampler) == 1


def test_lightning_leaves_the_sampler_to_each_rank_under_ddp():
    # What Lightning does with a training loader under DDP (here without starting processes): a sampler that is
    # not a DistributedSampler would be wrapped in one, each rank then taking every other batch of its own.
    from lightning.pytorch.trainer.states import RunningStage

    loader = numbered(max_tokens_per_batch=40).train_dataloader()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert trainer._accelerator_connector.is_distributed
    prepared = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
    assert prepared is loader and prepared.sampler is loader.sampler


# ----- resume ----------------------------------------------------------------------------------------------------
def test_a_resumed_loader_continues_with_the_next_whole_batches():
    data = numbered(max_tokens_per_batch=40)
    whole = data.train_dataloader()
    whole.sampler.set_epoch(1)
    expected = [numbers(batch) for batch in whole]

    saved = data.train_dataloader()
    saved.position = lambda: (1, 3)  # epoch 1, 3 batches trained
    state = saved.state_dict()
    assert state == {
        "epoch": 1,
        "batches": 3,
        "batch_size": None,
        "max_tokens_per_batch": 40,
        "pack_to_multiple_of": None,
        "num_replicas": 1,
        "examples": EXAMPLES,
        "seed": 7,
    }
    resumed = data.train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # as Lightning does before the epoch
    assert [numbers(batch) for batch in resumed] == expected[3:]
    assert len(resumed) == len(expected)  # Lightning counts on from the checkpoint's batch
    resumed.sampler.set_epoch(2)
    assert len(list(resumed)) == len(resumed)  # the next epoch is whole


@pytest.mark.parametrize(
    ("other", "changed"),
    [
        (dict(max_tokens_per_batch=48), r"max_tokens_per_batch 40 -> 48"),
        (dict(max_tokens_per_batch=40, pack_to_multiple_of=8), r"pack_to_multiple_of None -> 8"),
        (dict(batch_size=2), r"batch_size None -> 2, max_tokens_per_batch 40 -> None"),
    ],
)
def test_a_changed_batching_restarts_the_epoch_with_a_warning(other, changed):
    saved = numbered(max_tokens_per_batch=40).train_dataloader()
    saved.position = lambda: (1, 3)
    loader = numbered(**other).train_dataloader()
    with pytest.warns(UserWarning, match=changed + r".*\): epoch 1 restarts from its first batch instead of batch 4"):
        loader.load_state_dict(saved.state_dict())
    loader.sampler.set_epoch(1)
    assert len(list(loader)) == len(loader)  # the whole epoch


def test_resumable_loader_pairs_whole_batch_samplers_with_batch_size_none():
    budget = TokenBudgetSampler([5] * 8, 10, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="TokenBudgetSampler yields whole batches: pass batch_size=None, got 2"):
        ResumableDataLoader(list(range(8)), 2, sampler=budget)
    examples = LengthGroupedSampler([5] * 8, batch_size=2, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="LengthGroupedSampler yields single examples: pass a batch_size, got None"):
        ResumableDataLoader(list(range(8)), None, sampler=examples)


class RecordPacked(L.Callback):
    """``(epoch, example numbers)`` of every training batch, in order."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, numbers(batch)))


# Seed 6, 26 tokens: 9 batches an epoch.
SEED, BUDGET, EPOCH_BATCHES = 6, 26, (9, 9)


def _fit(root, callbacks, ckpt_path=None, val_size: int = 0, **trainer_args) -> tuple[LitSVDAdapter, L.Trainer]:
    L.seed_everything(3)
    module = LitSVDAdapter(
        make_tiny_model("llama"),
        AdapterConfig(method="lora", rank=2, target_modules=["q_proj", "v_proj"]),
        learning_rate=1e-2,
    )
    data = NumberedExamples(
        max_length=MAX_LENGTH, pack_sequences=True, max_tokens_per_batch=BUDGET, seed=SEED, val_size=val_size
    )
    settings = dict(
        max_epochs=2,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[SVDInit(), *callbacks],
    )
    trainer = quiet_cpu_trainer(root, -1, **(settings | trainer_args))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[list[tuple[int, list[int]]], dict[str, torch.Tensor], L.Trainer]:
    record = RecordPacked()
    module, trainer = _fit(tmp_path_factory.mktemp("whole"), [record])
    return record.batches, adapter_state_dict(module.model), trainer


def test_a_fit_takes_one_optimizer_step_per_token_budget_batch(uninterrupted):
    batches, _, trainer = uninterrupted
    reference = numbered(seed=SEED, max_tokens_per_batch=BUDGET).train_dataloader()
    for epoch, count in enumerate(EPOCH_BATCHES):
        reference.sampler.set_epoch(epoch)
        assert len(reference) == count
        trained = [these for seen_in, these in batches if seen_in == epoch]
        assert trained == [numbers(batch) for batch in reference]  # every batch of the epoch, in order
        assert sorted(n for these in trained for n in these) == list(range(1, EXAMPLES + 1))
    assert trainer.global_step == len(batches) == sum(EPOCH_BATCHES)  # one optimizer step per batch
    assert isinstance(trainer.train_dataloader.sampler, TokenBudgetSampler)


@pytest.mark.parametrize(
    ("kill", "every", "saved"),
    [(14, 4, 12), (10, 3, 9)],  # mid epoch 1; at epoch 0's last batch
)
def test_a_killed_fit_resumes_with_the_batches_of_the_uninterrupted_one(tmp_path, uninterrupted, kill, every, saved):
    whole, weights, _ = uninterrupted
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)
    with pytest.raises(Killed):
        _fit(tmp_path / "a", [KillAt(kill), checkpoints])
    (checkpoint,) = (tmp_path / "ckpt").glob(f"*step={saved}.ckpt")
    rest = RecordPacked()
    resumed, _ = _fit(tmp_path / "b", [rest], ckpt_path=checkpoint)
    assert rest.batches == whole[saved:]  # nothing repeated, nothing skipped, same order
    for key, value in adapter_state_dict(resumed.model).items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0, msg=key)


def test_a_fit_resumed_after_the_epoch_end_validation_sees_the_whole_next_epoch(tmp_path, uninterrupted):
    whole, _, _ = uninterrupted
    validated = dict(val_size=4, limit_val_batches=1, num_sanity_val_steps=0)  # the 4 held-out examples
    with pytest.raises(Killed):
        _fit(tmp_path / "a", [KillAt(10), AdapterCheckpoint(dirpath=tmp_path / "ckpt")], **validated)
    rest = RecordPacked()
    _fit(tmp_path / "b", [rest], ckpt_path=tmp_path / "ckpt" / "last.ckpt", **validated)
    assert rest.batches == whole[EPOCH_BATCHES[0] :]  # all 9 batches of epoch 1


# ----- arguments -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            dict(max_tokens_per_batch=1024),
            r"max_tokens_per_batch=1024 needs pack_sequences=True \(it fills one packed row per batch\), "
            r"got pack_sequences=False",
        ),
        (
            dict(pack_sequences=True, max_length=512, max_tokens_per_batch=500),
            r"max_tokens_per_batch=500 cannot hold one example of max_length=512 tokens; pass at least 512",
        ),
        (  # 512 tokens round up to 576: the collator always adds a padding sequence
            dict(pack_sequences=True, max_length=512, pack_to_multiple_of=64, max_tokens_per_batch=512),
            r"max_tokens_per_batch=512 cannot hold one example of max_length=512 tokens \(rounded up to "
            r"pack_to_multiple_of=64: 576\); pass at least 576",
        ),
        (
            dict(pack_sequences=True, max_length=512, pack_to_multiple_of=64, max_tokens_per_batch=6000),
            r"max_tokens_per_batch=6000 must be a multiple of pack_to_multiple_of=64 \(rows are rounded up to it\), "
            r"e\.g\. 5952 or 6016",
        ),
        (dict(pack_sequences=True, max_tokens_per_batch=0), r"max_tokens_per_batch must be positive or None, got 0"),
        (  # reported together with the other arguments' problems
            dict(batch_size=0, max_tokens_per_batch=6144),
            r"batch_size must be positive, got 0; max_tokens_per_batch=6144 needs pack_sequences=True",
        ),
    ],
)
def test_token_budget_arguments_are_checked(arguments, message):
    with pytest.raises(ValueError, match=message):
        GSM8KDataModule(**arguments)


def test_the_sampler_refuses_an_example_whose_row_alone_exceeds_the_budget():
    with pytest.raises(ValueError, match=r"example 2 has 16 tokens: its row alone \(24 tokens with "):
        TokenBudgetSampler([5, 8, 16, 3], 16, pack_to_multiple_of=8)
    assert len(TokenBudgetSampler([5, 8, 15, 3], 16, pack_to_multiple_of=8)) == 3  # 15 tokens: a row of 16


def test_the_token_budget_is_a_lightning_cli_argument(monkeypatch):
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["recipe.py"])

    class Model(LightningModule):
        def __init__(self, learning_rate: float = 1e-4) -> None:
            super().__init__()

    arguments = ["--data.pack_sequences", "true", "--data.max_tokens_per_batch", "6144", "--trainer.logger=false"]
    cli = LightningCLI(Model, GSM8KDataModule, run=False, args=arguments)
    assert cli.datamodule.max_tokens_per_batch == 6144 and cli.datamodule.pack_sequences
    assert cli.datamodule.hparams.max_tokens_per_batch == 6144
