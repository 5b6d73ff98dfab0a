"""Unnormalized Boltzmann densities with exact normalizing constants, for the samplers.

Every target is ``γ(x) = exp(−E(x))`` on R^D with an exact ``log_z = log ∫ γ``; the methods
take states of any shape ``(..., D)`` (the samplers use ``(B, N, D)``), compute in the dtype
of ``x`` and return ``(...)`` log-densities and ``(..., D)`` gradients:

- :class:`DiagonalGaussian` — ``N(μ, diag(s²))`` times ``exp(log_z)``; the samplers'
  reference distribution and a trivially exact target.
- :class:`ManyWell` — the many-well density of Midgley et al. (2023), D = 32 by default: the
  product of D/2 copies of the 2-D double well of Wu, Köhler & Noé (2020),
  ``E(d, v) = a·d + b·d² + c·d⁴ + v²/2`` with ``(a, b, c) = (−0.5, −6, 1)`` on the coordinate
  pairs ``(x_{2i}, x_{2i+1})``. It factorizes, so ``log Z`` is ``D/2`` times a 1-D quadrature
  plus ``log √(2π)`` per Gaussian coordinate, and the ``2^{D/2}`` modes (a sign per
  double-well coordinate) have the known weights ``Π_i P(sign_i)``.
- :class:`Funnel` — Neal's funnel (Neal 2003, "Slice sampling", Ann. Statist. 31, §8):
  ``v ~ N(0, σ²)``, ``z_i | v ~ N(0, e^v)``, i = 1..D−1, written without its constant, so
  ``log Z = ½ log(2πσ²) + (D−1)/2 · log 2π``. D = 10, σ = 3 as in the diffusion-sampler
  benchmarks (Vargas et al. 2023, Zhang & Chen 2022).
- :class:`GaussianMixture40` — the 40-component 2-D mixture of Midgley et al. (2023): equal
  weights, means uniform in ``[−40, 40]²`` drawn as ``(torch.rand(40, 2) − 0.5)·80`` from a
  generator seeded with 0 (the FAB construction), isotropic components with standard deviation
  ``softplus(1) ≈ 1.313``. Its unnormalized density is ``exp(log_z)·p(x)`` for a ``log_z`` you
  choose, and it has exact samples.

Sources: L. I. Midgley, V. Stimper, G. N. C. Simm, B. Schölkopf, J. M. Hernández-Lobato,
"Flow Annealed Importance Sampling Bootstrap", ICLR 2023 (many-well, 40-mode mixture);
H. Wu, J. Köhler, F. Noé, "Stochastic Normalizing Flows", NeurIPS 2020 (the double well; its
1-D normalizer ≈ 11784.50927 for the default constants, which :func:`double_well_log_z`
reproduces); R. M. Neal, "Slice sampling", Ann. Statist. 2003 (funnel).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "BoltzmannTarget",
    "DiagonalGaussian",
    "ManyWell",
    "Funnel",
    "GaussianMixture40",
    "double_well_log_z",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _sample_shape(shape: int | tuple[int, ...]) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


class BoltzmannTarget:
    """An unnormalized density ``γ(x) = exp(−E(x))`` on R^D with exact ``log Z``.

    Subclasses set ``dim`` and ``log_z`` and implement :meth:`log_prob_and_grad`; the rest is
    derived. ``log_z`` is a Python float (computed once, in float64).
    """

    dim: int
    log_z: float

    def log_prob_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log γ(x), ∇ log γ(x))`` for ``x`` of shape ``(..., D)``."""
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalized ``log γ(x)``, shape ``(...)``."""
        return self.log_prob_and_grad(x)[0]

    def grad_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``∇ log γ(x)``, shape ``(..., D)``."""
        return self.log_prob_and_grad(x)[1]

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """``E(x) = −log γ(x)``."""
        return -self.log_prob(x)

    def normalized_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log γ(x) − log Z``."""
        return self.log_prob(x) - self.log_z

    def sample(self, shape: int | tuple[int, ...],
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact i.i.d. samples ``(*shape, D)``."""
        raise NotImplementedError(f"{type(self).__name__} has no exact sampler")

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"x: expected shape (..., {self.dim}), got {tuple(x.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, log_z={self.log_z:.6f})"


class DiagonalGaussian(BoltzmannTarget):
    """``γ(x) = exp(log_z) · N(x; μ, diag(s²))``.

    Args:
        dim: D.
        mean: scalar or ``(D,)``; more generally any shape broadcastable against ``(..., D)``,
            e.g. ``(B, 1, D)`` for one reference per row of a ``(B, N, D)`` batch.
        scale: standard deviations s > 0, same broadcasting rules.
        log_z: log of the total mass (0: a normalized density).
        dtype, device: where the parameters live (float64 by default); computations run in the
            dtype of ``x``.
    """

    def __init__(
        self,
        dim: int,
        mean: float | torch.Tensor = 0.0,
        scale: float | torch.Tensor = 1.0,
        *,
        log_z: float = 0.0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        self.dim = int(dim)
        self.mean = torch.as_tensor(mean, dtype=dtype, device=device)
        self.scale = torch.as_tensor(scale, dtype=dtype, device=device)
        if self.scale.device.type == "cpu" and not bool((self.scale > 0).all()):
            raise ValueError("scale: expected standard deviations > 0")
        self.log_z = float(log_z)
        # Σ_d log s_d over the D coordinates (shape (...) when the scale varies per row).
        logs = torch.log(self.scale)
        if logs.dim() == 0:
            self._sum_log_scale = logs * self.dim
        else:
            self._sum_log_scale = torch.broadcast_to(logs, (*logs.shape[:-1], self.dim)).sum(-1)

    @property
    def variance(self) -> torch.Tensor:
        return self.scale**2

    def log_prob_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x)
        mu, s = self.mean.to(x.dtype), self.scale.to(x.dtype)
        z = (x - mu) / s
        lp = (-0.5 * (z * z).sum(-1) - self._sum_log_scale.to(x.dtype)
              - 0.5 * self.dim * _LOG_2PI + self.log_z)
        return lp, -z / s

    def sample(self, shape: int | tuple[int, ...],
               generator: torch.Generator | None = None) -> torch.Tensor:
        shape = _sample_shape(shape)
        eps = torch.randn(*shape, self.dim, dtype=self.mean.dtype, device=self.mean.device,
                          generator=generator)
        return self.mean + self.scale * eps


def _double_well_grid(a: float, b: float, c: float, points: int):
    """Grid, step and log-integrand of ``exp(−(a t + b t² + c t⁴))`` covering its mass."""
    if not c > 0:
        raise ValueError(f"c: the quartic coefficient must be > 0, got {c}")
    half = 2.0 * max(1.0, (abs(a) / c) ** (1 / 3), (abs(b) / c) ** 0.5) + (200.0 / c) ** 0.25
    t = torch.linspace(-half, half, points, dtype=torch.float64)
    return t, float(t[1] - t[0]), -(a * t + b * t**2 + c * t**4)


def double_well_log_z(a: float = -0.5, b: float = -6.0, c: float = 1.0,
                      points: int = 200_001) -> tuple[float, float]:
    """``(log ∫ exp(−(a t + b t² + c t⁴)) dt, P(t > 0))`` by the trapezoid rule.

    The integrand is smooth and decays like ``exp(−c t⁴)``, so the trapezoid rule on a
    truncated grid converges geometrically; with the default grid both numbers are exact to
    ~1e-12 (relative).
    """
    t, h, logf = _double_well_grid(a, b, c, points)
    m = logf.max()
    f = torch.exp(logf - m)
    total = h * (f.sum() - 0.5 * (f[0] + f[-1]))
    mid = (points - 1) // 2  # t[mid] == 0 exactly (symmetric odd grid)
    right = h * (f[mid:].sum() - 0.5 * (f[mid] + f[-1]))
    return float(m + torch.log(total)), float(right / total)


class ManyWell(BoltzmannTarget):
    """The many-well density: D/2 independent copies of the 2-D double well.

    ``log γ(x) = Σ_{i<D/2} −(a d_i + b d_i² + c d_i⁴) − v_i²/2`` with ``d_i = x_{2i}`` (the
    double-well coordinate) and ``v_i = x_{2i+1}`` (a standard Gaussian coordinate). With the
    default ``(a, b, c) = (−0.5, −6, 1)`` each ``d_i`` has wells near ±1.7 separated by a
    barrier of ≈ 10 nats, the right well holding probability :attr:`p_right` ≈ 0.85 (the
    linear term tilts it). ``log Z = (D/2)·(log Z₁ + ½ log 2π)`` with ``Z₁`` from
    :func:`double_well_log_z`.

    Args:
        dim: D, even (default 32: 2^16 modes).
        a, b, c: the double-well polynomial.
    """

    def __init__(self, dim: int = 32, a: float = -0.5, b: float = -6.0, c: float = 1.0) -> None:
        if dim < 2 or dim % 2:
            raise ValueError(f"dim: expected an even D >= 2, got {dim}")
        self.dim = int(dim)
        self.num_wells = self.dim // 2
        self.a, self.b, self.c = float(a), float(b), float(c)
        log_z1, p_right = double_well_log_z(self.a, self.b, self.c)
        self.log_z_1d = log_z1
        self.p_right = p_right
        self.log_z = self.num_wells * (log_z1 + 0.5 * _LOG_2PI)

    def log_prob_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x)
        xp = x.reshape(*x.shape[:-1], self.num_wells, 2)
        d, v = xp[..., 0], xp[..., 1]
        d2 = d * d
        lp = (-(self.a * d + self.b * d2 + self.c * d2 * d2) - 0.5 * v * v).sum(-1)
        gd = -(self.a + 2.0 * self.b * d + 4.0 * self.c * d2 * d)
        return lp, torch.stack([gd, -v], dim=-1).reshape(x.shape)

    def well_signs(self, x: torch.Tensor) -> torch.Tensor:
        """Which well each double-well coordinate is in: ``(..., D/2)`` bool, True = right."""
        self._check(x)
        return x[..., 0::2] > 0

    def mode_log_prob(self, signs: torch.Tensor) -> torch.Tensor:
        """Exact log-probability of the mode with the given well signs ``(..., D/2)`` bool."""
        lr, ll = math.log(self.p_right), math.log1p(-self.p_right)
        return torch.where(signs, lr, ll).sum(-1)

    def sample(self, shape: int | tuple[int, ...],
               generator: torch.Generator | None = None, *,
               dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Exact samples: inverse-CDF on the quadrature grid (linear interpolation) for the
        double-well coordinates, standard normals for the others."""
        shape = _sample_shape(shape)
        t, h, logf = _double_well_grid(self.a, self.b, self.c, 200_001)
        f = torch.exp(logf - logf.max())
        cdf = torch.cat([torch.zeros(1, dtype=f.dtype), torch.cumsum(0.5 * h * (f[1:] + f[:-1]),
                                                                     0)])
        cdf = cdf / cdf[-1]
        n = math.prod(shape) * self.num_wells
        gen_dev = generator.device if generator is not None else "cpu"
        u = torch.rand(n, dtype=torch.float64, device=gen_dev, generator=generator).cpu()
        j = torch.searchsorted(cdf, u).clamp(1, len(t) - 1)
        w = (u - cdf[j - 1]) / (cdf[j] - cdf[j - 1]).clamp_min(1e-300)
        d = t[j - 1] + w * (t[j] - t[j - 1])
        v = torch.randn(n, dtype=torch.float64, device=gen_dev, generator=generator).cpu()
        x = torch.stack([d, v], dim=-1).reshape(*shape, self.dim)
        return x.to(dtype=dtype, device=device)


class Funnel(BoltzmannTarget):
    """Neal's funnel: ``v ~ N(0, σ²)``, ``z_i | v ~ N(0, e^v)`` (i = 1..D−1), x = (v, z).

    ``log γ(x) = −v²/(2σ²) − (D−1)·v/2 − e^{−v}·|z|²/2`` (the normalized density without its
    constant), so ``log Z = ½ log(2πσ²) + (D−1)/2 · log 2π`` exactly.

    Args:
        dim: D >= 2 (default 10).
        sigma: standard deviation of v (default 3).
    """

    def __init__(self, dim: int = 10, sigma: float = 3.0) -> None:
        if dim < 2:
            raise ValueError(f"dim: expected D >= 2, got {dim}")
        self.dim = int(dim)
        self.sigma = float(sigma)
        self.log_z = 0.5 * math.log(2.0 * math.pi * self.sigma**2) + 0.5 * (dim - 1) * _LOG_2PI

    def log_prob_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x)
        v, z = x[..., 0], x[..., 1:]
        e = torch.exp(-v)
        r2 = (z * z).sum(-1)
        k = self.dim - 1
        lp = -0.5 * v * v / self.sigma**2 - 0.5 * k * v - 0.5 * e * r2
        gv = -v / self.sigma**2 - 0.5 * k + 0.5 * e * r2
        return lp, torch.cat([gv.unsqueeze(-1), -z * e.unsqueeze(-1)], dim=-1)

    def sample(self, shape: int | tuple[int, ...],
               generator: torch.Generator | None = None, *,
               dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> torch.Tensor:
        shape = _sample_shape(shape)
        gen_dev = generator.device if generator is not None else device
        eps = torch.randn(*shape, self.dim, dtype=dtype, device=gen_dev, generator=generator)
        v = self.sigma * eps[..., :1]
        return torch.cat([v, torch.exp(0.5 * v) * eps[..., 1:]], dim=-1).to(device=device)


def _fab_gmm_means(n: int, dim: int, loc_scaling: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand((n, dim), generator=g) - 0.5) * 2.0 * loc_scaling).double()


class GaussianMixture40(BoltzmannTarget):
    """The 40-mode 2-D Gaussian mixture times ``exp(log_z)`` (exact ``log Z`` and samples).

    ``γ(x) = exp(log_z) · (1/K) Σ_k N(x; μ_k, s² I)``; by default K = 40, D = 2, μ_k as in
    FAB (``(rand − 0.5)·2·40`` with a torch generator seeded 0, in float32 then widened),
    ``s = softplus(1)``.

    Args:
        log_z: the normalizer (any float; the samplers must recover it).
        num_components, dim, loc_scaling, seed: the FAB construction of the means.
        scale: component standard deviation (default ``softplus(1) ≈ 1.3133``).
        device: where the means live (float64).
    """

    def __init__(
        self,
        log_z: float = 0.0,
        *,
        num_components: int = 40,
        dim: int = 2,
        loc_scaling: float = 40.0,
        scale: float | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        self.dim = int(dim)
        self.log_z = float(log_z)
        self.means = _fab_gmm_means(num_components, self.dim, loc_scaling, seed).to(device)
        self.scale = math.log1p(math.e) if scale is None else float(scale)
        self.num_components = int(num_components)

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log γ_k(x) = log_z − log K + log N(x; μ_k, s² I)``, shape ``(..., K)``."""
        self._check(x)
        diff = x.unsqueeze(-2) - self.means.to(x.dtype)  # (..., K, D)
        const = (self.log_z - math.log(self.num_components)
                 - self.dim * (math.log(self.scale) + 0.5 * _LOG_2PI))
        return const - 0.5 * (diff * diff).sum(-1) / self.scale**2

    def log_prob_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x)
        diff = x.unsqueeze(-2) - self.means.to(x.dtype)
        const = (self.log_z - math.log(self.num_components)
                 - self.dim * (math.log(self.scale) + 0.5 * _LOG_2PI))
        lc = const - 0.5 * (diff * diff).sum(-1) / self.scale**2
        lp = torch.logsumexp(lc, -1)
        resp = torch.exp(lc - lp.unsqueeze(-1))
        grad = -(resp.unsqueeze(-1) * diff).sum(-2) / self.scale**2
        return lp, grad

    def nearest_component(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the most responsible component, ``(...)`` int64."""
        return self.component_log_prob(x).argmax(-1)

    def sample(self, shape: int | tuple[int, ...],
               generator: torch.Generator | None = None) -> torch.Tensor:
        shape = _sample_shape(shape)
        n = math.prod(shape)
        dev = self.means.device
        comp = torch.randint(self.num_components, (n,), device=dev, generator=generator)
        eps = torch.randn(n, self.dim, dtype=self.means.dtype, device=dev, generator=generator)
        return (self.means[comp] + self.scale * eps).reshape(*shape, self.dim)
