"""Dense-model targets (``calibration.targets: dense``): the coarsened KL, the adapters' loss, and a run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import icbs
from icbs import runner
from icbs.config import load_config
from icbs.evaluation import coarse_kl, distillation_loss, outcome_targets
from icbs.exceptions import ConfigError
from icbs.models.causal_lm import CausalLMAdapter
from icbs.models.classifier import ClassifierAdapter
from icbs.pool import SamplePool, calibration_loss
from icbs.targets import DENSE_IDS, DENSE_LOGP, DENSE_SAMPLE, with_dense_targets

transformers = pytest.importorskip("transformers")


def top_k_log_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k part of :func:`outcome_targets`."""
    return outcome_targets(logits, k, torch.Generator().manual_seed(0))[:2]


def sample_outcomes(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The sampled part of :func:`outcome_targets`."""
    return outcome_targets(logits, 1, generator)[2]


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """Full KL(softmax(p) || softmax(q)) along the last axis, in float64."""
    p = p_logits - np.log(np.exp(p_logits).sum(-1, keepdims=True))
    q = q_logits - np.log(np.exp(q_logits).sum(-1, keepdims=True))
    return (np.exp(p) * (p - q)).sum(-1)


def _coarse_kl_reference(p_logits: np.ndarray, q_logits: np.ndarray, k: int) -> np.ndarray:
    """KL of the (k + 1)-outcome distributions: each row's top k of p, and the rest lumped together."""
    out = []
    for p_row, q_row in zip(p_logits, q_logits):
        p = np.exp(p_row - p_row.max()); p /= p.sum()
        q = np.exp(q_row - q_row.max()); q /= q.sum()
        top = np.argsort(-p)[:k]
        pk, qk = np.append(p[top], 1 - p[top].sum()), np.append(q[top], 1 - q[top].sum())
        out.append(sum(a * np.log(a / b) for a, b in zip(pk, qk) if a > 0))
    return np.array(out)


def test_coarse_kl_is_the_full_kl_when_every_outcome_is_listed_and_zero_at_the_reference():
    gen = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(6, 20, generator=gen) * 2, torch.randn(6, 20, generator=gen) * 2
    ids, logp = top_k_log_probs(p_logits, 20)
    got = coarse_kl(q_logits, ids, logp).numpy()
    np.testing.assert_allclose(got, _kl(p_logits.double().numpy(), q_logits.double().numpy()), rtol=1e-4)
    assert torch.equal(coarse_kl(p_logits, ids, logp), torch.zeros(6))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_coarse_kl_matches_the_lumped_distributions_and_stays_below_the_full_kl(k):
    gen = torch.Generator().manual_seed(k)
    p_logits, q_logits = torch.randn(8, 30, generator=gen) * 2, torch.randn(8, 30, generator=gen) * 2
    got = coarse_kl(q_logits, *top_k_log_probs(p_logits, k)).double().numpy()
    p64, q64 = p_logits.double().numpy(), q_logits.double().numpy()
    np.testing.assert_allclose(got, _coarse_kl_reference(p64, q64, k), rtol=1e-4, atol=1e-6)
    assert np.all(got <= _kl(p64, q64) + 1e-6)
    assert np.all(got >= 0)


def test_distillation_loss_is_the_kl_in_value_and_the_sampled_outcomes_nll_in_gradient():
    gen = torch.Generator().manual_seed(3)
    dense, logits = torch.randn(5, 12, generator=gen), torch.randn(5, 12, generator=gen).requires_grad_(True)
    sample = sample_outcomes(dense, torch.Generator().manual_seed(0))
    loss = distillation_loss(logits, *top_k_log_probs(dense, 4), sample)
    assert torch.equal(loss.detach(), coarse_kl(logits.detach(), *top_k_log_probs(dense, 4)))
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    expected = torch.softmax(logits.detach(), -1) - torch.nn.functional.one_hot(sample.long(), 12)
    torch.testing.assert_close(grad, expected)
    # Many samples: the NLL's mean gradient is that of the cross-entropy to the dense distribution.
    many = sample_outcomes(dense.repeat(4000, 1), torch.Generator().manual_seed(1)).view(4000, 5)
    frequencies = torch.nn.functional.one_hot(many.long(), 12).double().mean(0)
    torch.testing.assert_close(frequencies, torch.softmax(dense.double(), -1), atol=0.03, rtol=0)


def _tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    return transformers.LlamaForCausalLM(config).eval()


def test_causal_lm_loss_with_dense_targets_is_the_mean_token_kl_over_real_targets():
    model, adapter = _tiny_llama(), CausalLMAdapter()
    ids = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # padding: its positions must not count
    batch = {"input_ids": ids, "attention_mask": mask}
    [targeted] = with_dense_targets(adapter, model, [batch], top_k=40)
    assert set(targeted) == {"input_ids", "attention_mask", DENSE_IDS, DENSE_LOGP, DENSE_SAMPLE}
    assert set(batch) == {"input_ids", "attention_mask"}  # the caller's batch is left as it was
    assert targeted[DENSE_IDS].shape == (3, 9, 40) and targeted[DENSE_LOGP].dtype == torch.float32
    assert targeted[DENSE_SAMPLE].shape == (3, 9)
    [again] = with_dense_targets(adapter, model, [batch], top_k=40)
    assert all(torch.equal(targeted[key], again[key]) for key in targeted)  # seeded: the same targets
    with torch.no_grad():
        assert float(adapter.per_sample_loss(model, targeted).abs().max()) < 1e-6
        dense_logits = model(input_ids=ids, attention_mask=mask).logits.double().numpy()
        for p in model.model.layers[0].mlp.parameters():
            p.mul_(0.3)
        logits = model(input_ids=ids, attention_mask=mask).logits.double().numpy()
        got = adapter.per_sample_loss(model, targeted).double().numpy()
    token_kl = _kl(dense_logits[:, :-1], logits[:, :-1])
    valid = (mask[:, 1:] * mask[:, :-1]).double().numpy()
    np.testing.assert_allclose(got, (token_kl * valid).sum(1) / valid.sum(1), rtol=1e-4)
    assert got.min() > 0


def test_classifier_dense_targets_give_the_kl_and_refuse_a_custom_loss():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4)).eval()
    batch = {"x": torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), "y": torch.zeros(6, dtype=torch.long)}
    adapter = ClassifierAdapter()
    [targeted] = with_dense_targets(adapter, model, [batch], top_k=10)
    assert targeted[DENSE_IDS].shape == (6, 4) and targeted[DENSE_SAMPLE].shape == (6,)  # capped at the 4 classes
    with torch.no_grad():
        dense = model(batch["x"]).double().numpy()
        model[0].weight.mul_(0.5)
        got = adapter.per_sample_loss(model, targeted).double().numpy()
        np.testing.assert_allclose(got, _kl(dense, model(batch["x"]).double().numpy()), rtol=1e-4, atol=1e-7)
    custom = ClassifierAdapter(loss=lambda logits, y: torch.nn.functional.cross_entropy(logits, y, reduction="none"))
    with pytest.raises(ValueError, match="'calibration.targets'"):
        with_dense_targets(custom, model, [batch], top_k=4)


@pytest.mark.parametrize(("key", "value"), [("calibration.targets", "teacher"), ("calibration.top_k", 0)])
def test_bad_target_settings_name_their_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[f"{key}={value}"])


def test_prune_refuses_batches_that_do_not_carry_what_calibration_targets_asks_for():
    model, adapter = _tiny_llama(), CausalLMAdapter()
    ids = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(2))
    plain = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense_cfg = load_config(overrides=["calibration.targets=dense", "blocks.block_size=16", "blocks.k=8",
                                       "derivatives.n_samples=4", "bcd.time_budget=null", "bcd.max_steps=1"])
    with pytest.raises(ValueError, match="'calibration.targets' is 'dense'"):
        icbs.prune(model, dense_cfg, plain, adapter.per_sample_loss)
    labels_cfg = dense_cfg.replace(calibration=dense_cfg.calibration.__class__(targets="labels"))
    with pytest.raises(ValueError, match="'calibration.targets' is 'labels'"):
        icbs.prune(model, labels_cfg, with_dense_targets(adapter, model, plain, 8), adapter.per_sample_loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("targets", ["dense", "dense_check"])
def test_cli_run_with_dense_targets_prunes_to_the_exact_density_and_lowers_the_kl(tmp_path, targets):
    cfg = load_config(overrides=[
        "model.kind=causal_lm", "model.builtin=tiny_llama", "model.device=cpu",
        "calibration.source=pydoc", "calibration.n_samples=12", "calibration.n_validation=4", "calibration.seq_len=32",
        "calibration.batch_size=4", f"calibration.targets={targets}", "calibration.top_k=16",
        "eval.n_samples=8", "eval.seq_len=32", "eval.batch_size=4", "eval.every_s=null",
        "scoring.init_method=magnitude", "blocks.block_size=32", "blocks.k=16", "derivatives.estimator=fisher",
        "derivatives.n_samples=8", "bcd.time_budget=null", "bcd.max_steps=6",
    ])
    outcome = runner.run_prune(cfg, out_dir=tmp_path / "out", progress=False)
    assert outcome.density == pytest.approx(0.5, abs=1e-6)
    report = outcome.report["prune"]
    assert report["init_loss"] > 0  # a KL: positive once pruned, zero only at the dense model
    assert 0 <= report["final_loss"] <= report["init_loss"]


def test_dense_check_estimates_on_the_labels_and_checks_on_the_kl():
    model, adapter = _tiny_llama(), CausalLMAdapter()
    ids = torch.randint(0, 40, (12, 8), generator=torch.Generator().manual_seed(4))
    batches = with_dense_targets(adapter, model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], 8)
    pool = SamplePool(batches, torch.device("cpu"), seed=0, n_per_step=4, n_validation=4, estimate_on_labels=True)
    step = pool.step_batch(0)
    assert set(step) == {"input_ids", "attention_mask"}  # the estimates follow the labels
    assert all(DENSE_SAMPLE in batch for batch in pool.validation + pool.batches)  # the checks read the KL
    assert float(calibration_loss(model, pool.validation, adapter.per_sample_loss, pool.device)) < 1e-6
    assert float(adapter.per_sample_loss(model, step).min()) > 1.0  # a next-token NLL, not a KL at the dense model
