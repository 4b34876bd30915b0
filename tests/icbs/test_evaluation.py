"""Evaluation: token-weighted perplexity, classifier accuracy/loss, density counted from weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from icbs.evaluation import density_report, evaluate_classifier, evaluate_lm, evaluate_lm_eval, token_nll


class _FixedLM(nn.Module):
    """Predicts token t+1 = (token t + 1) mod V with probability p, the rest spread evenly."""

    def __init__(self, vocab: int = 5, p: float = 0.6) -> None:
        super().__init__()
        self.vocab = vocab
        self.p = p
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, use_cache=None):  # noqa: ANN001, ANN201
        probs = torch.full((*input_ids.shape, self.vocab), (1 - self.p) / (self.vocab - 1))
        probs.scatter_(2, ((input_ids + 1) % self.vocab)[..., None], self.p)
        return type("Out", (), {"logits": probs.log()})()


def test_evaluate_lm_is_exp_of_mean_nll_over_all_tokens():
    model = _FixedLM()
    hit, miss = -math.log(0.6), -math.log(0.1)
    # Window 1: 4 targets, all hits. Window 2 (padded to 5): 2 valid targets, both misses.
    ids = torch.tensor([[0, 1, 2, 3, 4], [0, 3, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    result = evaluate_lm(model, [{"input_ids": ids, "attention_mask": mask}])
    expected = (4 * hit + 2 * miss) / 6
    assert result["n_tokens"] == 6
    assert result["loss"] == pytest.approx(expected)
    assert result["perplexity"] == pytest.approx(math.exp(expected))
    # Not the mean of per-window perplexities.
    assert result["perplexity"] != pytest.approx((math.exp(hit) + math.exp(miss)) / 2)
    nll, valid = token_nll(model(ids).logits, ids, mask)
    assert valid.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert float(nll[1, 2:].abs().sum()) == 0.0


def test_evaluate_lm_rejects_empty_input():
    with pytest.raises(ValueError, match="'batches'"):
        evaluate_lm(_FixedLM(), [])


def test_evaluate_classifier_accuracy_and_loss_and_mode_restored():
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    model.train()
    x = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    y = torch.tensor([0, 1, 0, 2])
    result = evaluate_classifier(model, [{"x": x[:2], "y": y[:2]}, {"x": x[2:], "y": y[2:]}], lambda m, b: m(b["x"]))
    assert result["accuracy"] == 0.5
    expected = torch.nn.functional.cross_entropy(x, y)
    assert result["loss"] == pytest.approx(float(expected), rel=1e-6)
    assert model.training


def test_density_report_counts_zeros_per_layer_and_globally():
    model = nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 5))
    with torch.no_grad():
        model[0].weight.view(-1)[:13] = 0.0
        model[1].weight.view(-1)[5:] = 0.0
    report = density_report(model, {"a": model[0], "b": model[1]})
    assert report["layers"]["a"] == {"density": 27 / 40, "n_kept": 27, "n_weights": 40, "shape": [4, 10]}
    assert report["layers"]["b"]["n_kept"] == 5
    assert report["global"] == {"density": 32 / 60, "n_kept": 32, "n_weights": 60}


def test_evaluate_lm_eval_needs_tasks_and_the_package():
    with pytest.raises(ValueError, match="'eval.lm_eval_tasks'"):
        evaluate_lm_eval(_FixedLM(), None, [])
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"icbs\[eval\]"):
            evaluate_lm_eval(_FixedLM(), None, ["arc_easy"])
    else:
        pytest.skip("lm_eval is installed")
