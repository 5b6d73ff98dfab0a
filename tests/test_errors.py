"""Bad input gives a clear error that names the argument; NaN log-weights are dead particles."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import assert_close, requires_cuda

import pathsmc
from pathsmc import reference as ref

NAN, INF = math.nan, math.inf
B, N, D = 2, 5, 3


def _inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, D, generator=g).to(device)
    drift = torch.randn(B, N, D, generator=g).to(device)
    logw = torch.randn(B, N, generator=g, dtype=torch.float64).to(device)
    return x, drift, logw


def _expect_error(fn, name: str, what: str | None = None) -> str:
    with pytest.raises((ValueError, TypeError)) as info:
        fn()
    msg = str(info.value)
    assert re.search(rf"(?<![\w\[]){re.escape(name)}(?![\w\[])", msg), (name, msg)
    if what is not None:
        assert what.lower() in msg.lower(), (what, msg)
    return msg


X, DR, LW = _inputs()
STEP = dict(dt=0.1, sigma=1.0)


def _em(**kw):
    args = dict(x=X, drift=DR, logw=LW, **STEP)
    args.update(kw)
    return lambda: pathsmc.em_step(args.pop("x"), args.pop("drift"), args.pop("logw"), **args)


EM_CASES = {
    "x_int": (_em(x=X.int(), drift=DR.int()), "x", "dtype"),
    "x_1d": (_em(x=X[0, 0], drift=DR[0, 0]), "x", "shape"),
    "x_not_tensor": (_em(x=X.tolist()), "x", "tensor"),
    "drift_shape": (_em(drift=DR[:, :4]), "drift", "shape"),
    "drift_dtype": (_em(drift=DR.double()), "drift", "dtype"),
    "logw_int": (_em(logw=LW.long()), "logw", "dtype"),
    "logw_shape": (_em(logw=LW[:, :4]), "logw", "shape"),
    "logw_3d": (_em(logw=LW[..., None]), "logw", "shape"),
    "logw_posinf": (_em(logw=LW.index_fill(1, torch.tensor([2]), INF)), "logw", "inf"),
    "noise_shape": (_em(noise=X[:, :, :2]), "noise", "shape"),
    "noise_dtype": (_em(noise=X.double()), "noise", "dtype"),
    "ref_shape": (_em(ref_drifts=[DR[:1]], ref_coefs=[1.0]), "ref_drifts[0]", "shape"),
    "ref_dtype": (_em(ref_drifts=[DR, DR.double()], ref_coefs=[1.0, 1.0]), "ref_drifts[1]",
                  "dtype"),
    "ref_coefs_len": (_em(ref_drifts=[DR], ref_coefs=[1.0, 0.5]), "ref_coefs", None),
    "ref_coefs_missing": (_em(ref_drifts=[DR]), "ref_coefs", None),
    "sigma_zero": (_em(sigma=0.0), "sigma", None),
    "sigma_negative": (_em(sigma=-1.0), "sigma", None),
    "sigma_nan": (_em(sigma=NAN), "sigma", None),
    "dt_zero": (_em(dt=0.0), "dt", None),
    "dt_inf": (_em(dt=INF), "dt", None),
    "refs_without_logw": (_em(logw=None, ref_drifts=[DR], ref_coefs=[1.0]), "logw", None),
    "fwd_without_logw": (_em(logw=None, fwd_coef=0.5), "logw", None),
}


def _kl(**kw):
    args = dict(y=X, base=DR, drift=None, logw=LW, **STEP)
    args.update(kw)
    return lambda: pathsmc.kernel_logpdf(args.pop("y"), args.pop("base"), args.pop("drift"),
                                         **args)


KL_CASES = {
    "y_int": (_kl(y=X.long(), base=DR.long()), "y", "dtype"),
    "base_shape": (_kl(base=DR[:, :, :1]), "base", "shape"),
    "base_dtype": (_kl(base=DR.double()), "base", "dtype"),
    "drift_shape": (_kl(drift=DR[:1]), "drift", "shape"),
    "logw_int": (_kl(logw=LW.int()), "logw", "dtype"),
    "logw_shape": (_kl(logw=LW[:1]), "logw", "shape"),
    "sigma_zero": (_kl(sigma=0.0), "sigma", None),
    "dt_negative": (_kl(dt=-0.1), "dt", None),
}

U_BAD = {"one": 1.0, "negative": -0.1, "nan": NAN, "inf": INF}

NORM_CASES = {
    "int": (lambda: pathsmc.normalize(LW.long()), "logw", "dtype"),
    "3d": (lambda: pathsmc.normalize(LW[..., None]), "logw", "shape"),
    "empty_row": (lambda: pathsmc.normalize(LW[:, :0]), "logw", "empty"),
    "empty_1d": (lambda: pathsmc.normalize(LW[0, :0]), "logw", "empty"),
    "posinf": (lambda: pathsmc.normalize(LW.index_fill(1, torch.tensor([0]), INF)), "logw",
               "inf"),
}


def _rs(logw=LW, scheme="systematic", num_samples=None, uniforms=None):
    return lambda: pathsmc.resample(logw, scheme, num_samples, uniforms=uniforms)


RESAMPLE_CASES = {
    "scheme_unknown": (_rs(scheme="systemic"), "scheme", "systematic"),
    "scheme_case": (_rs(scheme="Multinomial"), "scheme", None),
    "logw_int": (_rs(logw=LW.int()), "logw", "dtype"),
    "logw_3d": (_rs(logw=LW[..., None]), "logw", "shape"),
    "logw_posinf": (_rs(logw=LW.index_fill(1, torch.tensor([4]), INF)), "logw", "inf"),
    "logw_empty": (_rs(logw=LW[:, :0]), "logw", "empty"),
    "num_samples_zero": (_rs(num_samples=0), "num_samples", None),
    "num_samples_negative": (_rs(num_samples=-3), "num_samples", None),
    "uniforms_shape_sys": (_rs(uniforms=torch.rand(B, N, dtype=torch.float64)), "uniforms",
                           "shape"),
    "uniforms_shape_strat": (_rs(scheme="stratified", uniforms=torch.rand(B).double()),
                             "uniforms", "shape"),
    "uniforms_shape_m": (_rs(scheme="multinomial", num_samples=7,
                             uniforms=torch.rand(B, N).double()), "uniforms", "shape"),
    "uniforms_int": (_rs(uniforms=torch.zeros(B, dtype=torch.int64)), "uniforms", "dtype"),
    **{f"uniforms_{k}": (_rs(scheme="residual", uniforms=torch.full((B, N), v).double()),
                         "uniforms", "[0, 1)") for k, v in U_BAD.items()},
    **{f"uniforms_sys_{k}": (_rs(uniforms=torch.full((B,), v).double()), "uniforms", "[0, 1)")
       for k, v in U_BAD.items()},
}


def _ar(states=None, logw=LW, threshold=0.5, scheme="systematic", uniforms=None):
    st = [X, torch.arange(B * N).reshape(B, N)] if states is None else states
    return lambda: pathsmc.adaptive_resample(st, logw, threshold, scheme, uniforms=uniforms)


ADAPTIVE_CASES = {
    "states_shape": (_ar(states=[X, torch.zeros(B, N + 1)]), "states[1]", "shape"),
    "states_1d": (_ar(states=[X[0, :, 0]]), "states[0]", "shape"),
    "states_not_tensor": (_ar(states=[X, [1, 2]]), "states[1]", "tensor"),
    "threshold_negative": (_ar(threshold=-0.1), "threshold", None),
    "threshold_nan": (_ar(threshold=NAN), "threshold", None),
    "scheme": (_ar(scheme="bootstrap"), "scheme", None),
    "logw_int": (_ar(logw=LW.int()), "logw", "dtype"),
    "logw_3d": (_ar(logw=LW[..., None]), "logw", "shape"),
    "logw_posinf": (_ar(logw=LW.index_fill(1, torch.tensor([1]), INF)), "logw", "inf"),
    "logw_empty": (_ar(states=[X[:, :0]], logw=LW[:, :0]), "logw", "empty"),
    "uniforms_shape": (_ar(scheme="stratified", uniforms=torch.rand(B).double()), "uniforms",
                       "shape"),
    "uniforms_range": (_ar(uniforms=torch.tensor([0.2, 1.0], dtype=torch.float64)),
                       "uniforms", "[0, 1)"),
}


def _mala(**kw):
    args = dict(x=X, x_prop=X + 0.1, logp=LW, logp_prop=LW + 0.1, grad=DR, grad_prop=DR,
                step=0.1, uniforms=None)
    args.update(kw)
    return lambda: pathsmc.mala_accept(**args)


MALA_CASES = {
    "x_int": (_mala(x=X.int()), "x", "dtype"),
    "x_prop_shape": (_mala(x_prop=X[:, :4]), "x_prop", "shape"),
    "x_prop_dtype": (_mala(x_prop=X.double()), "x_prop", "dtype"),
    "grad_dtype": (_mala(grad=DR.double()), "grad", "dtype"),
    "grad_prop_shape": (_mala(grad_prop=DR[..., :1]), "grad_prop", "shape"),
    "logp_shape": (_mala(logp=LW[:, :3]), "logp", "shape"),
    "logp_int": (_mala(logp=LW.long()), "logp", "dtype"),
    "logp_prop_shape": (_mala(logp_prop=LW[:1]), "logp_prop", "shape"),
    "logp_prop_dtype": (_mala(logp_prop=LW.float()), "logp_prop", "dtype"),
    "step_zero": (_mala(step=0.0), "step", None),
    "step_negative": (_mala(step=-0.5), "step", None),
    "step_nan": (_mala(step=NAN), "step", None),
    "step_shape": (_mala(step=torch.ones(B + 1, dtype=torch.float64)), "step", "shape"),
    "step_2d": (_mala(step=torch.ones(B, 1, dtype=torch.float64)), "step", "shape"),
    "step_int": (_mala(step=torch.ones(B, dtype=torch.int64)), "step", "dtype"),
    "uniforms_shape": (_mala(uniforms=torch.rand(B).double()), "uniforms", "shape"),
    "uniforms_range": (_mala(uniforms=torch.full((B, N), 1.0, dtype=torch.float64)),
                       "uniforms", "[0, 1)"),
    "uniforms_nan": (_mala(uniforms=torch.full((B, N), NAN, dtype=torch.float64)),
                     "uniforms", "[0, 1)"),
}

K, C = 4, 3
LR = torch.zeros(K - 1, C, dtype=torch.float64)
SW = [torch.zeros(K, C, 2), torch.arange(K * C).reshape(K, C)]


def _swap(states=SW, log_ratio=LR, parity=0, uniforms=None):
    return lambda: pathsmc.replica_swap(states, log_ratio, parity, uniforms=uniforms)


SWAP_CASES = {
    "parity_2": (_swap(parity=2), "parity", None),
    "parity_negative": (_swap(parity=-1), "parity", None),
    "log_ratio_1d": (_swap(log_ratio=LR[0]), "log_ratio", None),
    "log_ratio_k1": (_swap(states=[s[:1] for s in SW], log_ratio=LR[:0]), "log_ratio", None),
    "log_ratio_int": (_swap(log_ratio=LR.long()), "log_ratio", "dtype"),
    "states_empty": (_swap(states=[]), "states", None),
    "states_shape": (_swap(states=[SW[0], SW[1][:, :2]]), "states[1]", "shape"),
    "states_levels": (_swap(states=[SW[0][:3]]), "states[0]", "shape"),
    "uniforms_shape": (_swap(uniforms=torch.rand(K, C).double()), "uniforms", "shape"),
    "uniforms_range": (_swap(uniforms=torch.full((K - 1, C), -0.5).double()), "uniforms",
                       "[0, 1)"),
}

ALL_CASES = {
    **{f"em_step-{k}": v for k, v in EM_CASES.items()},
    **{f"kernel_logpdf-{k}": v for k, v in KL_CASES.items()},
    **{f"normalize-{k}": v for k, v in NORM_CASES.items()},
    **{f"resample-{k}": v for k, v in RESAMPLE_CASES.items()},
    **{f"adaptive_resample-{k}": v for k, v in ADAPTIVE_CASES.items()},
    **{f"mala_accept-{k}": v for k, v in MALA_CASES.items()},
    **{f"replica_swap-{k}": v for k, v in SWAP_CASES.items()},
}


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_bad_input_names_the_argument(case):
    fn, name, what = ALL_CASES[case]
    _expect_error(fn, name, what)


@requires_cuda
def test_mixed_devices_name_the_argument():
    xc, dc, lc = _inputs("cuda")
    _expect_error(lambda: pathsmc.em_step(X, dc, LW, **STEP), "drift", "device")
    _expect_error(lambda: pathsmc.em_step(xc, dc, LW, **STEP), "logw", "device")
    _expect_error(lambda: pathsmc.em_step(xc, dc, lc, **STEP, noise=X), "noise", "device")
    _expect_error(lambda: pathsmc.em_step(xc, dc, lc, ref_drifts=[DR], ref_coefs=[1.0],
                                          **STEP), "ref_drifts[0]", "device")
    _expect_error(lambda: pathsmc.kernel_logpdf(xc, DR, logw=lc, **STEP), "base", "device")
    _expect_error(lambda: pathsmc.resample(lc, uniforms=torch.rand(B).double()), "uniforms",
                  "device")
    _expect_error(lambda: pathsmc.adaptive_resample([X], lc), "states[0]", "device")
    _expect_error(lambda: pathsmc.mala_accept(xc, xc, lc, LW, dc, dc, 0.1), "logp_prop",
                  "device")
    _expect_error(lambda: pathsmc.mala_accept(xc, xc, lc, lc, dc, dc,
                                              torch.ones(B, dtype=torch.float64)), "step",
                  "device")
    _expect_error(lambda: pathsmc.replica_swap([s.cuda() for s in SW], LR, 0), "states[0]",
                  "device")


_EMPTY_STEP_OPS = {
    "em_step": (lambda x, lw: pathsmc.em_step(x, x, lw, **STEP), "x"),
    "kernel_logpdf": (lambda x, lw: (pathsmc.kernel_logpdf(x, x, logw=lw, **STEP),), "y"),
    "mala_accept": (lambda x, lw: pathsmc.mala_accept(x, x, lw, lw, x, x, 0.1), "x"),
}


@pytest.mark.parametrize("form", ["N_D", "B_N_D", "B_N_event"])
@pytest.mark.parametrize("op", list(_EMPTY_STEP_OPS))
def test_empty_population_in_state_ops(op, form):
    """N = 0 states: a clear error naming the states argument, or empty outputs; never a
    low-level reshape error."""
    shape = {"N_D": (0, D), "B_N_D": (B, 0, D), "B_N_event": (B, 0, 2, 2)}[form]
    x = torch.zeros(shape)
    lw = torch.zeros(shape[:-1] if form == "N_D" else shape[:2], dtype=torch.float64)
    fn, name = _EMPTY_STEP_OPS[op]
    try:
        out = fn(x, lw)
    except (ValueError, TypeError) as exc:
        assert re.search(rf"(?<![\w\[]){name}(?![\w\[])", str(exc)), str(exc)
        return
    for o in out:
        assert o.numel() == 0 and o.shape in (x.shape, lw.shape)


def test_sigma_zero_without_logw_is_a_plain_drift_step():
    x_new, lw = pathsmc.em_step(X, DR, None, dt=0.25, sigma=0.0)
    assert lw is None
    assert_close(x_new, X + 0.25 * DR, rtol=1e-6, atol=1e-6)


# ---- NaN log-weights: dead particles, not errors ----

def test_nan_logw_is_a_dead_particle(device):
    x, drift, logw = _inputs(device)
    logw[0, 1] = NAN
    logw[1, 3] = -INF
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device)
    # em_step / kernel_logpdf: dead stays dead, the others are untouched by it
    _, lw = pathsmc.em_step(x, drift, logw, **STEP, ref_drifts=[drift * 0.5], ref_coefs=[1.0],
                            noise=noise)
    _, lw_ref = ref.em_step(x, drift, logw, **STEP, ref_drifts=[drift * 0.5], ref_coefs=[1.0],
                            noise=noise)
    assert torch.isnan(lw[0, 1]) and torch.isneginf(lw[1, 3])
    finite = torch.isfinite(logw)
    assert torch.isfinite(lw[finite]).all()
    assert_close(lw, lw_ref, rtol=2e-5, atol=2e-4)
    kl = pathsmc.kernel_logpdf(x, drift, logw=logw, **STEP)
    assert torch.isnan(kl[0, 1]) and torch.isneginf(kl[1, 3])
    assert torch.isfinite(kl[finite]).all()
    # normalize: weight 0, ESS and log mean from the live particles only
    lwn, log_mean, ess = pathsmc.normalize(logw)
    assert torch.isneginf(lwn[0, 1]) and not torch.isnan(lwn).any()
    assert torch.isfinite(log_mean).all() and torch.isfinite(ess).all()
    # resample / adaptive_resample: never an ancestor
    for scheme in ("systematic", "stratified", "multinomial", "residual"):
        anc = pathsmc.resample(logw, scheme, 50, generator=torch.Generator(device).manual_seed(0))
        assert not (anc[0] == 1).any() and not (anc[1] == 3).any()
        _, lw_out, anc, res = pathsmc.adaptive_resample([x], logw, 2.0, scheme)
        assert res.all() and not (anc[0] == 1).any() and not (anc[1] == 3).any()
        assert torch.isfinite(lw_out).all()


def test_nonfinite_state_kills_the_particle(device):
    # a NaN (or inf) in x, or an x' that overflows, must not leave a finite log-weight
    x, drift, logw = _inputs(device)
    x[0, 2, 0] = NAN
    x[1, 0, 1] = INF
    x_new, lw = pathsmc.em_step(x, drift, logw, **STEP)
    assert torch.isnan(lw[0, 2]) and torch.isnan(lw[1, 0])
    alive = torch.ones_like(logw, dtype=torch.bool)
    alive[0, 2] = alive[1, 0] = False
    assert torch.isfinite(lw[alive]).all() and torch.isfinite(x_new[alive]).all()


@pytest.mark.parametrize("name", ["dt", "sigma"])
@pytest.mark.parametrize("bad", ["0.1", True, None])
def test_step_scalars_must_be_numbers(name, bad):
    x, drift, logw = _inputs("cpu")
    kw = dict(STEP, **{name: bad})
    with pytest.raises(TypeError, match=rf"^{name}: expected a float"):
        pathsmc.em_step(x, drift, logw, **kw)
    with pytest.raises(TypeError, match=rf"^{name}: expected a float"):
        pathsmc.kernel_logpdf(x, drift, logw=logw, **kw)
    # the pure-PyTorch twins (ops=pathsmc.reference) say the same
    with pytest.raises(TypeError, match=rf"^{name}: expected a float"):
        ref.em_step(x, drift, logw, **kw)
    with pytest.raises(TypeError, match=rf"^{name}: expected a float"):
        ref.kernel_logpdf(x, drift, logw=logw, **kw)


def test_all_dead_row_is_reported_not_nan(device):
    _, _, logw = _inputs(device)
    logw[1] = NAN
    lwn, log_mean, ess = pathsmc.normalize(logw)
    assert ess[1].item() == 0.0 and torch.isneginf(log_mean[1])
    assert not torch.isnan(lwn).any()
    x = torch.arange(B * N, device=device).reshape(B, N)
    out, lw_out, anc, res = pathsmc.adaptive_resample([x], logw, 2.0)
    assert res.tolist() == [True, False]
    assert torch.equal(out[0][1], x[1]) and torch.equal(anc[1], torch.arange(N, device=device))
    assert torch.isfinite(lw_out[0]).all()
