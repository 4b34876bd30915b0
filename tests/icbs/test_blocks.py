"""Tests for icbs.blocks: tabu-aware block selection for each pattern."""

import pytest
import torch
from torch import nn

from icbs.blocks import check_block_size, select_block
from icbs.scoring import init_masks, score
from icbs.state import MaskPattern, PruningState


def _state(pattern="unstructured", shape=(8, 16), tabu_frac=0.3, fix=(0.0, 0.0)):
    torch.manual_seed(0)
    layers = {"l": nn.Linear(shape[1], shape[0])}
    pat = MaskPattern.from_config(0.5, pattern)
    state = PruningState(layers, pat, tabu_frac)
    scores = {"l": score("magnitude", "per_layer", layers["l"].weight)}
    state.set_masks(init_masks(scores, pat))
    state.fix_extremes(scores, *fix)
    return state


def test_select_block_unstructured_takes_best_pruned_and_worst_kept():
    state = _state(fix=(0.25, 0.25))
    ls = state["l"]
    sel = torch.rand(8, 16, generator=torch.Generator().manual_seed(4))
    idx = select_block(state, "l", sel, 10, 3)
    assert idx.numel() == 10 and idx.unique().numel() == 10
    keep = ls.keep_mask.view(-1)
    free = ls.free_mask().view(-1)
    assert bool(free[idx].all())
    pruned, kept = idx[~keep[idx]], idx[keep[idx]]
    assert pruned.numel() == 3 and kept.numel() == 7
    s = sel.view(-1)
    other_pruned = free & ~keep
    other_pruned[pruned] = False
    assert float(s[pruned].min()) >= float(s[other_pruned].max())
    other_kept = free & keep
    other_kept[kept] = False
    assert float(s[kept].max()) <= float(s[other_kept].min())


def test_select_block_skips_tabu_weights():
    state = _state()
    sel = torch.rand(8, 16, generator=torch.Generator().manual_seed(5))
    first = select_block(state, "l", sel, 8, 4)
    state.push_tabu("l", first)
    second = select_block(state, "l", sel, 8, 4)
    assert not set(first.tolist()) & set(second.tolist())
    assert int((~state["l"].keep_mask.view(-1)[second]).sum()) == 4


def test_select_block_shrinks_when_candidates_run_out():
    state = _state(shape=(2, 8), tabu_frac=0.5)
    sel = torch.rand(2, 8)
    state.push_tabu("l", torch.arange(8))
    idx = select_block(state, "l", sel, 12, 6)
    assert idx.tolist() == list(range(8, 16))


def test_select_block_nm_takes_whole_groups_with_a_possible_swap():
    state = _state("2:4")
    sel = torch.rand(8, 16, generator=torch.Generator().manual_seed(6))
    idx = select_block(state, "l", sel, 8, 4)
    assert idx.numel() == 8
    groups = torch.div(idx, 4, rounding_mode="floor")
    assert all(int((groups == g).sum()) == 4 for g in groups.unique())
    constraints = state.block_groups("l", idx)
    assert [k for _, k in constraints] == [2, 2]


def test_select_block_per_output_fills_from_rows_keeping_both_kinds():
    state = _state("per_output", shape=(4, 32))
    sel = torch.rand(4, 32, generator=torch.Generator().manual_seed(7))
    idx = select_block(state, "l", sel, 12, 6)
    assert idx.numel() == 12
    keep = state["l"].keep_mask.view(-1)
    for positions, k in state.block_groups("l", idx):
        assert 0 < k < positions.size  # every row segment can swap
    assert int((~keep[idx]).sum()) == 6


def test_check_block_size_names_setting_and_layer():
    with pytest.raises(ValueError, match="'blocks.block_size' \\(20\\) is larger than the 16 free weights of layer 'fc2'"):
        check_block_size(20, 4, {"fc1": 40, "fc2": 16})
    with pytest.raises(ValueError, match="'blocks.k' should be <= blocks.block_size"):
        check_block_size(8, 9, {"fc1": 40})
    check_block_size(16, 8, {"fc1": 40, "fc2": 16})
