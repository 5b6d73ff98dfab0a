"""pathsmc.learn on the Markov token model: every objective is at its optimum at the DP soft
values (residuals and gradients zero to rounding), a perturbed twist gives a positive loss, and
twists learned by contrastive twist learning / path consistency approach the DP values and cut
the variance of twisted SMC."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pathsmc.learn import (
    TokenValue,
    consistency_residuals,
    contrastive_twist_loss,
    log_variance_loss,
    path_consistency_loss,
    path_log_weights,
    sample_token_paths,
    token_log_ratios,
    train_token_twist,
)
from pathsmc.targets import MarkovSequence
from pathsmc.twisted_sequence import twisted_smc

B, T, V = 2, 6, 4
MODEL = MarkovSequence.random(batch=B, vocab=V, length=T, beta=1.0, end_penalty=2.0, seed=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def exact_twist(scale: float = 0.0, seed: int = 0) -> TokenValue:
    """The DP soft values as a TokenValue, optionally perturbed by scale·N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    h = MODEL.to_go() + scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tw = TokenValue(B, T, V, init=h)
    with torch.no_grad():
        tw.log_z.copy_(MODEL.log_z())
    return tw


def paths(tw: TokenValue, n: int = 64, seed: int = 0):
    return sample_token_paths(MODEL, tw, n, generator=torch.Generator().manual_seed(seed))


def all_sequences() -> torch.Tensor:
    """Every sequence of length T, ``(B, V^T, T)``."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)), dtype=torch.int64)
    return seqs[None].expand(B, -1, -1).contiguous()


def test_values_are_the_soft_values() -> None:
    tw = exact_twist()
    tokens = paths(tw).tokens
    assert torch.equal(tw.values(MODEL, tokens), MODEL.soft_values(tokens))


@pytest.mark.parametrize("span", [1, 3, None])
def test_residuals_zero_at_soft_values(span) -> None:
    """Path consistency (eq. 21), sub-trajectory and one-step residuals are zero per path."""
    tw = exact_twist()
    tokens = paths(tw).tokens
    res = consistency_residuals(tw.values(MODEL, tokens), token_log_ratios(MODEL, tw, tokens),
                                span)
    assert res.shape[-1] == (1 if span is None else T - span + 1)
    assert float(res.detach().abs().max()) < 1e-12


def test_off_policy_paths_also_zero() -> None:
    """Residuals vanish on paths from any distribution (here the prior proposal)."""
    tw = exact_twist()
    tokens = sample_token_paths(MODEL, tw, 64, proposal="prior", threshold=0.0,
                                generator=torch.Generator().manual_seed(3)).tokens
    res = consistency_residuals(tw.values(MODEL, tokens), token_log_ratios(MODEL, tw, tokens),
                                1)
    assert float(res.detach().abs().max()) < 1e-12


@pytest.mark.parametrize("span", [1, 2, None])
def test_gradients_vanish_and_perturbed_loss_positive(span) -> None:
    tw = exact_twist()
    tokens = paths(tw).tokens
    loss = path_consistency_loss(tw.values(MODEL, tokens), token_log_ratios(MODEL, tw, tokens),
                                 span)
    loss.backward()
    assert float(loss) < 1e-25
    assert float(tw.table.grad.abs().max()) < 1e-12
    assert float(tw.log_z.grad.abs().max()) < 1e-12
    bad = exact_twist(0.3)
    lb = path_consistency_loss(bad.values(MODEL, tokens), token_log_ratios(MODEL, bad, tokens),
                               span)
    lb.backward()
    assert float(lb) > 1e-3
    assert float(bad.table.grad.abs().max()) > 1e-3


def test_log_variance_zero_at_soft_values() -> None:
    tw, bad = exact_twist(), exact_twist(0.3)
    tokens = paths(tw).tokens
    for twist, check in ((tw, lambda v: v < 1e-25), (bad, lambda v: v > 1e-3)):
        lw = path_log_weights(token_log_ratios(MODEL, twist, tokens),
                              MODEL.log_reward(tokens))
        assert check(float(log_variance_loss(lw)))


def ctl_exact(tw: TokenValue) -> torch.Tensor:
    """The contrastive loss with exact expectations: every sequence, positives weighted by the
    target π, negatives for step t weighted by p(x) (so that p(x_{1:t}) exp V_t^θ)."""
    seqs = all_sequences()
    logp = MODEL.log_prob(seqs)
    values = tw.values(MODEL, seqs)[..., 1:T]
    base = logp[..., None].expand(-1, -1, T - 1) + math.log(seqs.shape[1])
    return contrastive_twist_loss(values, MODEL.log_target(seqs), values, base)


def test_contrastive_optimum_is_the_soft_value() -> None:
    """With exact expectations L(θ) − L(θ*) = Σ_t KL(π_t ‖ π_t^θ): zero gradient at the DP
    values, larger loss anywhere else."""
    tw = exact_twist()
    loss = ctl_exact(tw)
    loss.backward()
    assert float(tw.table.grad.abs().max()) < 1e-12
    for seed in range(3):
        bad = exact_twist(0.3, seed)
        lb = ctl_exact(bad)
        lb.backward()
        assert float(lb - loss) > 1e-3
        assert float(bad.table.grad.abs().max()) > 1e-3


def test_contrastive_sample_gradient_matches_exact() -> None:
    """The SMC positives / proposal negatives give the exact gradient in expectation."""
    bad = exact_twist(0.3)
    ctl_exact(bad).backward()
    exact_grad = bad.table.grad.clone()
    bad.table.grad = None
    pos = sample_token_paths(MODEL, bad, 4096, generator=torch.Generator().manual_seed(5))
    neg = sample_token_paths(MODEL, bad, 4096, threshold=0.0,
                             generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        base = token_log_ratios(MODEL, bad, neg.tokens).cumsum(-1)[..., :T - 1]
    contrastive_twist_loss(bad.values(MODEL, pos.tokens)[..., 1:T], pos.log_weights,
                           bad.values(MODEL, neg.tokens)[..., 1:T], base).backward()
    err = (bad.table.grad - exact_grad)[:, :T - 1]
    assert float(err.abs().max()) < 0.05 < float(exact_grad.abs().max())


def smc_log_z_std(table: torch.Tensor, reps: int = 32) -> torch.Tensor:
    res = twisted_smc(MODEL.repeat(reps), 16, twist=table.detach().repeat_interleave(reps, 0),
                      generator=torch.Generator().manual_seed(1))
    return res.log_z.view(B, reps).std(1)


@pytest.mark.parametrize("objective", ["ctl", "path_consistency"])
def test_learned_twist_approaches_dp_and_cuts_variance(objective: str) -> None:
    tw = TokenValue(B, T, V)
    # CTL's gradient is noisier (two Monte Carlo terms): smaller steps, more of them
    lr, its = (0.03, 200) if objective == "ctl" else (0.1, 100)
    train_token_twist(MODEL, tw, objective=objective, iterations=its, particles=256, lr=lr,
                      generator=torch.Generator().manual_seed(0))
    # twists are identified up to a constant per (row, t) by CTL: compare centred tables
    # weighted by the target's marginals
    d = (tw.table.detach() - MODEL.to_go())[:, :T - 1]
    mg = MODEL.marginals()[:, :T - 1]
    d = d - (mg * d).sum(-1, keepdim=True)
    mse = float((mg * d * d).sum(-1).mean())
    zero = MODEL.to_go()[:, :T - 1]
    zero = zero - (mg * zero).sum(-1, keepdim=True)
    mse0 = float((mg * zero * zero).sum(-1).mean())
    assert mse < 0.2 * mse0
    untrained = smc_log_z_std(torch.zeros(B, T, V, dtype=torch.float64))
    learned = smc_log_z_std(tw.table)
    assert bool((learned < untrained / 2.5).all())
