"""Tests for icbs.layers: choosing and validating the layers to prune."""

import pytest
from torch import nn

from icbs.layers import check_layers, find_prunable


def test_find_prunable_skips_head_and_embedding(transformer_problem):
    model, _, _ = transformer_problem()
    layers = find_prunable(model)
    assert list(layers) == ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    assert all(isinstance(m, nn.Linear) for m in layers.values())


def test_find_prunable_include_exclude_and_explicit_head(transformer_problem):
    model, _, _ = transformer_problem()
    assert list(find_prunable(model, include=[r"proj$"], exclude=["^[qk]_"])) == ["v_proj", "o_proj", "up_proj", "down_proj"]
    assert list(find_prunable(model, include=["lm_head", "up"])) == ["up_proj", "lm_head"]


def test_find_prunable_pattern_matching_nothing_names_it(transformer_problem):
    model, _, _ = transformer_problem()
    with pytest.raises(ValueError, match="'model.include' pattern 'attn_nothing' matches no"):
        find_prunable(model, include=["attn_nothing"])
    with pytest.raises(ValueError, match="'model.exclude' pattern 'zzz'"):
        find_prunable(model, exclude=["zzz"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        find_prunable(model, include=["("])


def test_check_layers_rejects_embedding_foreign_and_duplicate(transformer_problem):
    model, _, _ = transformer_problem()
    with pytest.raises(TypeError, match="layer 'embed' is not prunable.*Embedding"):
        check_layers(model, {"embed": model.embed})
    with pytest.raises(ValueError, match="not a submodule"):
        check_layers(model, {"other": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="appears twice"):
        check_layers(model, {"a": model.q_proj, "b": model.q_proj})
    with pytest.raises(ValueError, match="at least one"):
        check_layers(model, {})
    assert check_layers(model, {"q": model.q_proj}) == {"q": model.q_proj}


def test_output_heads_by_name_or_the_last_linear_of_a_classifier(transformer_problem):
    from icbs.layers import output_heads

    model, _, _ = transformer_problem()
    assert output_heads(model) == output_heads(model, last_linear=True) == {"lm_head"}
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert output_heads(mlp) == set()
    assert output_heads(mlp, last_linear=True) == {"2"}
    assert list(find_prunable(mlp, heads=output_heads(mlp, last_linear=True))) == ["0"]
    assert list(find_prunable(mlp, include=["2"], heads={"2"})) == ["2"]
