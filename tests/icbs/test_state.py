"""Tests for icbs.state: masks, fixed sets, tabu memory, moves, restore and invariants."""

import pytest
import torch
from torch import nn

from icbs.exceptions import PruningError
from icbs.scoring import init_masks, score
from icbs.state import MaskPattern, PruningState, round_half_up


def _layers(seed=0, shapes=((6, 8), (4, 12))):
    torch.manual_seed(seed)
    return {f"l{i}": nn.Linear(n_in, n_out) for i, (n_out, n_in) in enumerate(shapes)}


def _state(pattern="unstructured", density=0.5, tabu_frac=0.5, shapes=((6, 8), (4, 12))):
    layers = _layers(shapes=shapes)
    pat = MaskPattern.from_config(density, pattern)
    state = PruningState(layers, pat, tabu_frac)
    scores = {n: score("magnitude", "per_layer", m.weight) for n, m in layers.items()}
    state.set_masks(init_masks(scores, pat))
    return layers, state, scores


def test_round_half_up_rounds_halves_up():
    assert [round_half_up(v) for v in (2.5, 3.5, 2.49, 0.5)] == [3, 4, 2, 1]


@pytest.mark.parametrize("pattern,density", [("unstructured", 0.3), ("per_output", 0.4), ("2:4", 0.5)])
def test_state_targets_match_pattern(pattern, density):
    layers, state, _ = _state(pattern, density)
    for name, module in layers.items():
        n_out, n_in = module.weight.shape
        mask = state[name].keep_mask
        if pattern == "unstructured":
            assert int(mask.sum()) == round_half_up(density * n_out * n_in) == state.target_kept(name)
        elif pattern == "per_output":
            assert mask.sum(dim=1).tolist() == [round_half_up(density * n_in)] * n_out
        else:
            assert mask.reshape(-1, 4).sum(dim=1).eq(2).all()


def test_state_construction_leaves_model_alone_and_apply_restore_roundtrip():
    layers = _layers()
    dense = {n: m.weight.detach().clone() for n, m in layers.items()}
    pat = MaskPattern.from_config(0.5, "unstructured")
    state = PruningState(layers, pat, 0.2)
    assert all(torch.equal(layers[n].weight, dense[n]) for n in layers)
    scores = {n: score("magnitude", "per_layer", m.weight) for n, m in layers.items()}
    state.set_masks(init_masks(scores, pat))
    state.apply()
    for n, m in layers.items():
        assert torch.equal(m.weight, dense[n] * state[n].keep_mask)
    state.restore()
    assert all(torch.equal(layers[n].weight, dense[n]) for n in layers)


def test_fix_extremes_picks_lowest_pruned_and_highest_kept():
    layers, state, scores = _state(tabu_frac=0.5)
    state.fix_extremes(scores, 0.25, 0.5)
    ls = state["l0"]  # 48 weights: 24 pruned, 24 kept
    assert int(ls.fixed_pruned.sum()) == 6 and int(ls.fixed_kept.sum()) == 12
    s = scores["l0"]
    pruned_scores = s[~ls.keep_mask]
    assert float(s[ls.fixed_pruned].max()) <= float(torch.sort(pruned_scores).values[5])
    assert float(s[ls.fixed_kept].min()) >= float(torch.sort(s[ls.keep_mask], descending=True).values[11])
    assert state.free_counts(0.25, 0.5)["l0"] == 48 - 6 - 12 == int(ls.free_mask().sum())
    assert ls.tabu.maxlen == round_half_up(0.5 * 30)


def test_apply_move_writes_block_undo_restores_and_fixed_is_protected():
    layers, state, scores = _state()
    state.apply()
    ls = state["l0"]
    keep = ls.keep_mask.view(-1)
    p, k = int(torch.nonzero(~keep)[0]), int(torch.nonzero(keep)[0])
    idx = torch.tensor([p, k])
    before = layers["l0"].weight.detach().clone()
    old = state.apply_move("l0", idx, torch.tensor([True, False]))
    state.check_invariants("l0")
    w = layers["l0"].weight.view(-1)
    assert w[p] == ls.w0.view(-1)[p] and w[k] == 0
    state.apply_move("l0", idx, old)
    assert torch.equal(layers["l0"].weight, before)
    state.fix_extremes(scores, 0.5, 0.0)
    fixed = int(torch.nonzero(ls.fixed_pruned.view(-1))[0])
    kept = int(torch.nonzero(ls.keep_mask.view(-1))[0])
    with pytest.raises(PruningError, match="fixed weight"):
        state.apply_move("l0", torch.tensor([fixed, kept]), torch.tensor([True, False]))


def test_check_invariants_catches_broken_counts():
    _, state, _ = _state("per_output", 0.5)
    mask = state["l1"].keep_mask
    row0 = mask[0]
    row0[torch.nonzero(~row0)[0]] = True  # one extra kept weight in row 0
    with pytest.raises(PruningError, match="density invariant"):
        state.check_invariants("l1")


def test_set_masks_rejects_wrong_counts():
    layers = _layers()
    state = PruningState(layers, MaskPattern.from_config(0.5, "unstructured"), 0.0)
    with pytest.raises(PruningError, match="should keep"):
        state.set_masks({n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()})


def test_tabu_is_fifo_with_capacity():
    _, state, _ = _state(tabu_frac=0.1)  # l0: 48 free -> capacity 5
    cap = state["l0"].tabu.maxlen
    assert cap == 5
    state.push_tabu("l0", torch.arange(4))
    state.push_tabu("l0", torch.tensor([10, 11, 12]))
    assert list(state["l0"].tabu) == [2, 3, 10, 11, 12]
    assert state["l0"].tabu_mask().view(-1).nonzero().squeeze(1).tolist() == [2, 3, 10, 11, 12]


def test_block_groups_per_pattern():
    _, state, _ = _state("2:4")
    keep = state["l0"].keep_mask.view(-1)
    idx = torch.tensor([0, 1, 2, 3, 5, 6])
    groups = state.block_groups("l0", idx)
    assert [g.tolist() for g, _ in groups] == [[0, 1, 2, 3], [4, 5]]
    assert [k for _, k in groups] == [int((~keep[[0, 1, 2, 3]]).sum()), int((~keep[[5, 6]]).sum())]
    _, state_u, _ = _state("unstructured")
    (positions, k), = state_u.block_groups("l1", torch.tensor([1, 20, 40]))
    assert positions.tolist() == [0, 1, 2]


def test_state_dict_roundtrip_and_mismatch_errors():
    layers, state, scores = _state()
    state.fix_extremes(scores, 0.2, 0.2)
    state.push_tabu("l1", torch.tensor([3, 4]))
    state["l1"].steps = 7
    data = state.state_dict()
    other = PruningState(layers, MaskPattern.from_config(0.5, "unstructured"), 0.5)
    other.load_state_dict(data)
    for n in layers:
        assert torch.equal(other[n].keep_mask, state[n].keep_mask)
        assert torch.equal(other[n].fixed_kept, state[n].fixed_kept)
    assert list(other["l1"].tabu) == [3, 4] and other["l1"].steps == 7
    wrong = PruningState(layers, MaskPattern.from_config(0.25, "unstructured"), 0.5)
    with pytest.raises(ValueError, match="pruning.pattern"):
        wrong.load_state_dict(data)
    with torch.no_grad():
        layers["l0"].weight.mul_(0.5)
    moved = PruningState(layers, MaskPattern.from_config(0.5, "unstructured"), 0.5)
    with pytest.raises(ValueError, match="original"):
        moved.load_state_dict(data)


def test_pattern_rejects_incompatible_layers():
    with pytest.raises(ValueError, match="multiple of 4"):
        PruningState({"a": nn.Linear(6, 2)}, MaskPattern.from_config(0.5, "2:4"), 0.0)
    with pytest.raises(ValueError, match="'pruning.density'"):
        MaskPattern.from_config(1.0, "unstructured")
    with pytest.raises(ValueError, match="nothing would be pruned"):
        PruningState({"a": nn.Linear(2, 2)}, MaskPattern.from_config(0.2, "per_output"), 0.0)
