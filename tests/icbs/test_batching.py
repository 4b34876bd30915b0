"""Tests for icbs.batching: the dict-of-tensors batch helpers."""

import pytest
import torch

from icbs.batching import batch_size, batch_to, concat_batches, index_batch, split_batch


def _lm_batch(n: int = 5, t: int = 4) -> dict[str, torch.Tensor]:
    ids = torch.arange(n * t).reshape(n, t)
    return {"input_ids": ids, "attention_mask": torch.ones(n, t, dtype=torch.long)}


def test_batch_size_counts_samples():
    assert batch_size(_lm_batch(5)) == 5


def test_batch_size_rejects_mismatched_leading_dimension():
    with pytest.raises(ValueError, match="leading dimension"):
        batch_size({"x": torch.zeros(3, 2), "y": torch.zeros(4)})
    with pytest.raises(ValueError, match="empty"):
        batch_size({})
    with pytest.raises(TypeError, match="Tensor"):
        batch_size({"x": [1, 2]})


def test_index_batch_selects_rows_for_every_key():
    batch = _lm_batch(5)
    picked = index_batch(batch, torch.tensor([4, 1]))
    assert torch.equal(picked["input_ids"], batch["input_ids"][[4, 1]])
    assert picked["attention_mask"].shape == (2, 4)
    one = index_batch(batch, 2)
    assert torch.equal(one["input_ids"], batch["input_ids"][2:3])
    last = index_batch(batch, -1)
    assert torch.equal(last["input_ids"], batch["input_ids"][4:5])
    assert torch.equal(index_batch(batch, slice(1, 3))["input_ids"], batch["input_ids"][1:3])
    with pytest.raises(IndexError):
        index_batch(batch, 5)


def test_split_then_concat_round_trips():
    batch = _lm_batch(7)
    parts = split_batch(batch, 3)
    assert [batch_size(p) for p in parts] == [3, 3, 1]
    joined = concat_batches(parts)
    assert all(torch.equal(joined[k], batch[k]) for k in batch)
    with pytest.raises(ValueError, match="'size' should be a positive int"):
        split_batch(batch, 0)


def test_concat_batches_rejects_different_keys():
    with pytest.raises(ValueError, match="keys"):
        concat_batches([{"x": torch.zeros(2)}, {"y": torch.zeros(2)}])
    with pytest.raises(ValueError):
        concat_batches([])


def test_batch_to_moves_without_mutating():
    batch = _lm_batch(2)
    moved = batch_to(batch, "cpu")
    assert moved is not batch
    assert all(moved[k].device.type == "cpu" for k in moved)
