"""The discrete sequence target (exact soft values by DP) and twisted SMC over token sequences.

Ground truth comes from brute-force enumeration of every sequence on a tiny space (V = 3,
T = 5) and from the DP on larger ones. Statistical checks use fixed seeds and k-SE bounds with
the SE estimated from independent rows.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pathsmc.smc import smc
from pathsmc.targets.sequence import MarkovSequence, sample_categorical
from pathsmc.twisted_sequence import TwistedSequenceSMC, twisted_smc


@pytest.fixture(autouse=True)
def _one_thread(restore_threads):
    """The tensors here are small: one intra-op thread is fastest, and on busy shared cores
    avoids OpenMP contention (10× slower runs with 2 threads under load)."""
    torch.set_num_threads(1)


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---- brute force on a tiny space ---------------------------------------------------------

def all_sequences(vocab: int, length: int) -> torch.Tensor:
    """Every sequence, lexicographic (first position most significant): ``(V^T, T)``."""
    return torch.tensor(list(itertools.product(range(vocab), repeat=length)), dtype=torch.int64)


def brute_log_joint(m: MarkovSequence, seqs: torch.Tensor, upto: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(x_{1:t}), Σ_{s≤t} R_s(x_s))`` per row and sequence, ``(B, K)``, by plain
    advanced indexing (independent of the library's gathers)."""
    t = m.length if upto is None else upto
    b = torch.arange(m.batch)[:, None]
    lp = torch.zeros(m.batch, seqs.shape[0], dtype=torch.float64)
    r = torch.zeros_like(lp)
    for k in range(t):
        if k == 0:
            lp = lp + m.log_init[b, seqs[None, :, 0]]
        else:
            lp = lp + m.log_trans[b, seqs[None, :, k - 1], seqs[None, :, k]]
        r = r + m.rewards[b, k, seqs[None, :, k]]
    return lp, r


def brute_soft_values(m: MarkovSequence, seqs: torch.Tensor) -> torch.Tensor:
    """``V_t(x_{1:t}) = log Σ_{completions} p(x_{t+1:T} | x_{1:t}) e^{r(x)}`` for every full
    sequence and t = 0..T, ``(B, K, T + 1)``."""
    lp, r = brute_log_joint(m, seqs)
    joint = lp + r
    v, t_len = m.vocab, m.length
    out = []
    for t in range(t_len + 1):
        grouped = torch.logsumexp(joint.view(m.batch, v**t, v ** (t_len - t)), -1)
        prefix_lp, _ = brute_log_joint(m, seqs, upto=t)
        vt = grouped.repeat_interleave(v ** (t_len - t), 1) - prefix_lp
        out.append(vt)
    return torch.stack(out, -1)


TINY = [
    dict(beta=0.8, end_penalty=1.5, sharpness=1.0, seed=3),
    dict(beta=1.3, end_penalty=math.inf, sharpness=2.0, seed=4),
]


@pytest.mark.parametrize("kw", TINY)
def test_dp_soft_values_match_enumeration(kw):
    m = MarkovSequence.random(batch=3, vocab=3, length=5, **kw)
    seqs = all_sequences(3, 5)
    toks = seqs.expand(3, -1, -1).contiguous()
    lp, r = brute_log_joint(m, seqs)
    torch.testing.assert_close(m.log_prob(toks), lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.log_reward(toks), r, rtol=1e-12, atol=1e-12)
    log_z = torch.logsumexp(lp + r, -1)
    torch.testing.assert_close(m.log_z(), log_z, rtol=1e-12, atol=1e-12)
    vs = m.soft_values(toks)
    torch.testing.assert_close(vs, brute_soft_values(m, seqs), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vs[..., 0], log_z[:, None].expand(3, seqs.shape[0]))
    torch.testing.assert_close(vs[..., -1], r)  # V_T = r
    # target and its per-position marginals
    log_pi = lp + r - log_z[:, None]
    torch.testing.assert_close(m.log_target(toks), log_pi, rtol=1e-10, atol=1e-10)
    pi = log_pi.exp()
    brute_marg = torch.zeros(3, 5, 3, dtype=torch.float64)
    for k in range(5):
        brute_marg[:, k].index_add_(1, seqs[:, k], pi)
    torch.testing.assert_close(m.marginals(), brute_marg, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw", TINY)
def test_optimal_policy_is_the_target_conditional(kw):
    """eq. 9: q*(x_{t+1}|x_{1:t}) = p(x_{t+1}|x_t) exp(V_{t+1} − V_t) = π(x_{1:t+1}) / π(x_{1:t}),
    a normalized policy (martingale property of exp V)."""
    m = MarkovSequence.random(batch=2, vocab=3, length=5, **kw)
    seqs = all_sequences(3, 5)
    lp, r = brute_log_joint(m, seqs)
    joint = lp + r
    q1, q = m.optimal_proposal()
    torch.testing.assert_close(q1.exp().sum(-1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(q.exp().sum(-1), torch.ones(2, 4, 3, dtype=torch.float64))
    b = torch.arange(2)[:, None]
    for t in range(5):  # prefix length t, next token x_{t+1} (index t)
        num = torch.logsumexp(joint.view(2, 3 ** (t + 1), -1), -1).repeat_interleave(
            3 ** (5 - t - 1), 1)
        den = torch.logsumexp(joint.view(2, 3**t, -1), -1).repeat_interleave(3 ** (5 - t), 1)
        want = num - den
        got = q1[b, seqs[None, :, 0]] if t == 0 else q[b, t - 1, seqs[None, :, t - 1],
                                                       seqs[None, :, t]]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor, z: float = 5.0) -> bool:
    """Pearson χ² of ``counts`` against ``probs`` within z·sd of its df (cells with p > 0); no
    mass where p = 0."""
    n = counts.sum()
    live = probs > 0
    if bool((counts[~live] > 0).any()):
        return False
    exp = n * probs[live]
    stat = ((counts[live] - exp) ** 2 / exp).sum().item()
    df = int(live.sum()) - 1
    return stat < df + z * math.sqrt(2 * df)


@pytest.mark.parametrize("kw", TINY)
def test_exact_sampler_matches_enumeration(kw):
    m = MarkovSequence.random(batch=2, vocab=3, length=5, **kw)
    seqs = all_sequences(3, 5)
    lp, r = brute_log_joint(m, seqs)
    pi = (lp + r - torch.logsumexp(lp + r, -1, keepdim=True)).exp()
    x = m.sample(20000, gen(0))
    code = (x * (3 ** torch.arange(4, -1, -1))).sum(-1)  # lexicographic index
    for row in range(2):
        counts = torch.bincount(code[row], minlength=243).double()
        assert chi2_ok(counts, pi[row])
    # a wrong target (the prior) is rejected by the same check
    p = lp[0].exp()
    assert not chi2_ok(torch.bincount(code[0], minlength=243).double(), p / p.sum())


def test_sample_categorical_frequencies_and_zero_mass():
    logits = torch.log(torch.tensor([0.5, 0.0, 0.2, 0.3], dtype=torch.float64))
    x = sample_categorical(logits.expand(40000, 4), gen(1))
    counts = torch.bincount(x, minlength=4).double()
    assert counts[1] == 0
    assert chi2_ok(counts, logits.exp())


# ---- twisted SMC --------------------------------------------------------------------------

def zero_variance_error(res, m: MarkovSequence) -> tuple[float, float]:
    """(max spread of the final log-weights within a row, max |log Ẑ − log Z|)."""
    spread = (res.logw - res.logw[:, :1]).abs().max().item()
    return spread, (res.log_z - m.log_z()).abs().max().item()


def zero_variance_ok(res, m: MarkovSequence, tol: float = 1e-9) -> bool:
    spread, err = zero_variance_error(res, m)
    return spread < tol and err < tol


@pytest.mark.parametrize("threshold,scheme", [(0.5, "systematic"), (1.0, "multinomial")])
def test_exact_twists_give_zero_variance_log_z(device, threshold, scheme):
    m = MarkovSequence.random(batch=6, vocab=10, length=16, beta=1.0, seed=5, device=device)
    res = twisted_smc(m, 128, twist="exact", threshold=threshold, scheme=scheme,
                      generator=gen(7, device), progress=False)
    spread, err = zero_variance_error(res, m)
    assert spread < 1e-12 and err < 1e-9, (spread, err)
    assert res.particles.shape == (6, 128, 16) and res.particles.dtype == torch.int64
    assert (res.particles >= 0).all() and (res.particles < 10).all()
    # the carried states are the exact soft value V_T = r and the reward so far (= r)
    r = m.log_reward(res.particles)
    torch.testing.assert_close(res.states[1], r)
    torch.testing.assert_close(res.states[2], r)
    assert torch.isfinite(r).all()  # the hard "ends in b mod V" constraint always holds
    assert (res.particles[..., -1] == (torch.arange(6, device=device) % 10)[:, None]).all()
    assert (res.ess > 128 - 1e-9).all()
    assert not res.dead_rows


def test_exact_twists_particles_are_target_samples():
    """Equal weights and no resampling: the particles are i.i.d. draws from π; compare the
    marginals of the first, a middle and the last token with the exact ones."""
    m = MarkovSequence.random(batch=2, vocab=6, length=12, beta=1.0, end_penalty=1.0, seed=8)
    res = twisted_smc(m, 8000, twist="exact", generator=gen(9), progress=False)
    assert not res.resampled.any()
    marg = m.marginals()
    for row in range(2):
        for k in (0, 6, 11):
            counts = torch.bincount(res.particles[row, :, k], minlength=6).double()
            assert chi2_ok(counts, marg[row, k]), (row, k)


def z_ratio_stats(res, m: MarkovSequence) -> tuple[float, float]:
    """Mean of Ẑ/Z over rows and its standard error (from the rows)."""
    ratio = torch.exp(res.log_z - m.log_z())
    return ratio.mean().item(), ratio.std().item() / math.sqrt(ratio.numel())


def unbiased_ok(res, m: MarkovSequence, k: float = 4.0, max_se: float = 0.25) -> bool:
    """Mean of Ẑ/Z within k SE of 1, with an SE small enough for the check to have power."""
    mean, se = z_ratio_stats(res, m)
    return abs(mean - 1.0) < k * se + 1e-3 and se < max_se


def noisy_problem(rows: int = 400, noise: float = 0.7, seed: int = 11):
    """4 problems (soft end constraint) × (rows/4) consecutive independent repeats, and
    perturbed exact twists (independent noise per repeat)."""
    m = MarkovSequence.random(batch=4, vocab=8, length=12, beta=1.0, end_penalty=2.0,
                              seed=seed).repeat(rows // 4)
    return m, m.noisy_to_go(noise, gen(seed + 1))


CASES = {  # twist, proposal, particles
    "noisy-twisted": ("noisy", "twisted", 64),
    "noisy-prior": ("noisy", "prior", 64),
    "reward-twisted": ("reward", "twisted", 64),
    "bootstrap": ("none", "prior", 256),
}


def marginal_errors(res, m: MarkovSequence, problems: int = 4) -> torch.Tensor:
    """|estimate − exact| / SE of the last-token marginal per problem and token.

    The unnormalized SMC estimate ``(1/N) Σ_i w_i 1[x_i,T = v] / Z`` is unbiased for
    ``π(x_T = v)`` (no self-normalization bias); it is averaged over the repeats of each
    problem, with the SE from the repeats (plus a 1e-3 floor for cells no particle visits)."""
    v = m.vocab
    w = torch.exp(res.logw - m.log_z()[:, None]) / res.logw.shape[1]  # (B, N)
    onehot = torch.nn.functional.one_hot(res.particles[..., -1], v).double()
    est = (w[..., None] * onehot).sum(1).view(problems, -1, v)  # (problem, repeats, V)
    exact = m.marginals()[:: m.batch // problems, -1]
    se = est.std(1) / math.sqrt(est.shape[1])
    return (est.mean(1) - exact).abs() / (se + 1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_approximate_twists_stay_unbiased(case):
    twist, proposal, n = CASES[case]
    m, noisy = noisy_problem()
    res = twisted_smc(m, n, twist=noisy if twist == "noisy" else twist, proposal=proposal,
                      generator=gen(13), progress=False)
    assert unbiased_ok(res, m), (case, z_ratio_stats(res, m))
    assert not res.dead_rows
    if twist != "none":  # the bootstrap's heavy-tailed weights make the rows' SE unreliable
        assert (marginal_errors(res, m) < 5).all(), case


def test_noisy_twists_have_variance_but_exact_do_not():
    """The zero-variance property is specific to the exact twists."""
    m, noisy = noisy_problem(rows=8)
    res = twisted_smc(m, 64, twist=noisy, generator=gen(3), progress=False)
    assert not zero_variance_ok(res, m)
    res = twisted_smc(m, 64, twist="exact", generator=gen(3), progress=False)
    assert zero_variance_ok(res, m)


def test_callable_twist_equals_table_twist():
    m = MarkovSequence.random(batch=3, vocab=5, length=8, seed=2)
    h = m.to_go()

    def exact_twist(k, tokens, reward):
        assert (tokens[..., k:] == -1).all() and (tokens[..., :k] >= 0).all()
        return reward + h[:, k, None, :]

    a = twisted_smc(m, 32, twist=exact_twist, generator=gen(4), progress=False)
    b = twisted_smc(m, 32, twist="exact", generator=gen(4), progress=False)
    assert torch.equal(a.particles, b.particles)
    torch.testing.assert_close(a.logw, b.logw)
    assert zero_variance_ok(a, m)


def test_reproducible_with_generator():
    m = MarkovSequence.random(batch=2, vocab=6, length=10, seed=1)
    a = twisted_smc(m, 64, twist="reward", generator=gen(5), progress=False)
    b = twisted_smc(m, 64, twist="reward", generator=gen(5), progress=False)
    assert torch.equal(a.particles, b.particles) and torch.equal(a.logw, b.logw)


# ---- the tests fail when the weight formula is perturbed -----------------------------------

class DropPrev(TwistedSequenceSMC):
    """Forgets the − Ṽ_k(x_{1:k}) term."""

    def log_weight_increment(self, v_prev, v_new, log_p, log_q):
        return v_new + (log_p - log_q)


class DropRatio(TwistedSequenceSMC):
    """Forgets the proposal correction p/q."""

    def log_weight_increment(self, v_prev, v_new, log_p, log_q):
        return v_new - v_prev


class FlipRatio(TwistedSequenceSMC):
    """q/p instead of p/q."""

    def log_weight_increment(self, v_prev, v_new, log_p, log_q):
        return v_new - v_prev - (log_p - log_q)


class HalfTwist(TwistedSequenceSMC):
    """A coefficient 1/2 on the twist difference."""

    def log_weight_increment(self, v_prev, v_new, log_p, log_q):
        return 0.5 * (v_new - v_prev) + (log_p - log_q)


@pytest.mark.parametrize("cls", [DropPrev, DropRatio, FlipRatio, HalfTwist])
def test_perturbed_weight_formula_is_detected(cls):
    small = MarkovSequence.random(batch=4, vocab=8, length=12, beta=1.0, seed=11)
    exact = smc(cls(small, twist="exact"), 64, small.batch, generator=gen(21), progress=False)
    assert not zero_variance_ok(exact, small)
    m, noisy = noisy_problem()
    res = smc(cls(m, twist=noisy), 64, m.batch, generator=gen(13), progress=False)
    assert not unbiased_ok(res, m), z_ratio_stats(res, m)
    # the unperturbed formula passes the same two checks on the same runs
    good = smc(TwistedSequenceSMC(small, twist="exact"), 64, small.batch, generator=gen(21),
               progress=False)
    assert zero_variance_ok(good, small)
    good = smc(TwistedSequenceSMC(m, twist=noisy), 64, m.batch, generator=gen(13),
               progress=False)
    assert unbiased_ok(good, m)


# ---- argument checks ---------------------------------------------------------------------

def test_bad_arguments_are_named():
    m = MarkovSequence.random(batch=2, vocab=4, length=5)
    with pytest.raises(ValueError, match="proposal"):
        TwistedSequenceSMC(m, proposal="greedy")
    with pytest.raises(ValueError, match="twist: expected a to-go table"):
        TwistedSequenceSMC(m, twist=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="twist: expected"):
        TwistedSequenceSMC(m, twist="optimal")
    with pytest.raises(ValueError, match="batch: the sequence model has 2 rows"):
        smc(TwistedSequenceSMC(m), 8, 3, progress=False)
    with pytest.raises(ValueError, match="log_trans: expected normalized"):
        MarkovSequence(m.log_init, m.log_trans + 1.0, m.rewards)
    with pytest.raises(ValueError, match="rewards"):
        MarkovSequence(m.log_init, m.log_trans, m.rewards[0, 0])
    with pytest.raises(ValueError, match="tokens"):
        m.log_prob(torch.zeros(2, 3, 4, dtype=torch.int64))
