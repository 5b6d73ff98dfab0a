"""Gaussian mixtures with exact diffused densities, scores and closed-form tilts.

A mixture ``p(x) = Σ_k π_k N(x; μ_k, Σ_k)`` in any dimension D, batched over leading dims of
``x``. Under a diffusion schedule with ``X_t = m(t) X_0 + sqrt(v(t)) ε`` (VP or VE,
:mod:`pathsmc.schedules`) the marginal at time t is again a mixture with components
``N(m μ_k, m² Σ_k + v I)`` (:meth:`GaussianMixture.diffused`), so scores, log-densities and the
posterior mean E[X_0 | X_t] (Tweedie) are exact at every t.

Reward tilts with closed-form answers:

- linear ``exp(θ·x)``: components ``N(μ_k + Σ_k θ, Σ_k)``, weights ∝ ``π_k exp(θ·μ_k + θᵀΣ_kθ/2)``,
  ``log Z = log Σ_k π_k exp(θ·μ_k + θᵀΣ_kθ/2)`` (:meth:`GaussianMixture.linear_tilt`);
- quadratic ``exp(−½ xᵀAx + bᵀx)`` with every ``Σ_k⁻¹ + A`` positive definite
  (:meth:`GaussianMixture.quadratic_tilt`).

Products and powers:

- the product of mixtures ``p(x) q(x)`` is a mixture with K1·K2 components and known normalizer
  ``Z = Σ_ij π_i ρ_j N(μ_i; ν_j, Σ_i + S_j)`` (:meth:`GaussianMixture.product`,
  :func:`mixture_product`);
- powers ``p^β`` and geometric products ``Π_k p_k^{β_k}`` (any real β: tempering, classifier-free
  guidance) in 1-D and 2-D by quadrature on a grid (:meth:`GaussianMixture.power`,
  :func:`geometric_product`), as a :class:`GridTarget` with log Z, moments and a sampler.

Parameters are stored in float64 by default; computations run in the promoted dtype of the
input and the parameters (float64 for the default parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from pathsmc.schedules import VESchedule, VPSchedule

__all__ = [
    "GaussianMixture",
    "DiffusedGaussianMixture",
    "GridTarget",
    "Tilt",
    "default_2d",
    "geometric_product",
    "mixture_product",
]

_LOG_2PI = math.log(2.0 * math.pi)


class Tilt(NamedTuple):
    """A tilted mixture ``p(x) · exp(r(x)) / Z`` and its exact ``log Z`` (0-dim tensor)."""

    mixture: GaussianMixture
    log_z: torch.Tensor


def _as_covariances(covs: torch.Tensor, k: int, d: int) -> torch.Tensor:
    if covs.dim() == 2 and tuple(covs.shape) == (k, d):
        return torch.diag_embed(covs)
    if covs.dim() == 3 and tuple(covs.shape) == (k, d, d):
        return covs
    raise ValueError(f"covs: expected shape ({k}, {d}) (diagonal) or ({k}, {d}, {d}) (full), "
                     f"got {tuple(covs.shape)}")


def _cholesky(mats: torch.Tensor, name: str, validate: bool = True) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(mats)
    if validate and bool((info != 0).any()):
        bad = int(torch.nonzero(info)[0, 0])
        raise ValueError(f"{name}: matrix {bad} is not symmetric positive definite")
    return chol


class GaussianMixture:
    """``p(x) = Σ_k π_k N(x; μ_k, Σ_k)`` with exact log-density, score and sampler.

    Args:
        weights: ``(K,)`` positive mixture weights (normalized here).
        means: ``(K, D)`` component means.
        covs: ``(K, D)`` diagonal variances or ``(K, D, D)`` full covariances (SPD).
        dtype: parameter dtype (default float64).
        device: parameter device (default: that of ``means``).
    """

    def __init__(
        self,
        weights: torch.Tensor,
        means: torch.Tensor,
        covs: torch.Tensor,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        validate: bool = True,
    ) -> None:
        means = torch.as_tensor(means)
        device = means.device if device is None else torch.device(device)
        means = means.to(device=device, dtype=dtype)
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means: expected shape (K, D) with K, D >= 1, "
                             f"got {tuple(means.shape)}")
        k, d = means.shape
        weights = torch.as_tensor(weights).to(device=device, dtype=dtype)
        if tuple(weights.shape) != (k,):
            raise ValueError(f"weights: expected shape ({k},), got {tuple(weights.shape)}")
        # (validate=False: derived mixtures whose parameters are valid by construction skip
        # these data-dependent checks, which would sync with a GPU at every diffusion step)
        if validate and (not bool((weights > 0).all()) or not bool(torch.isfinite(weights).all())):
            raise ValueError("weights: expected finite positive mixture weights")
        covs = _as_covariances(torch.as_tensor(covs).to(device=device, dtype=dtype), k, d)
        covs = 0.5 * (covs + covs.transpose(-1, -2))
        self.log_weights = torch.log(weights) - torch.logsumexp(torch.log(weights), 0)
        self.means = means
        self.covs = covs
        self._chol = _cholesky(covs, "covs", validate)
        self._prec = torch.cholesky_inverse(self._chol)
        self._logdet = 2.0 * torch.log(torch.diagonal(self._chol, dim1=-2, dim2=-1)).sum(-1)

    # ---- basic properties ----

    @property
    def weights(self) -> torch.Tensor:
        """Normalized mixture weights ``(K,)``."""
        return self.log_weights.exp()

    @property
    def num_components(self) -> int:
        """K."""
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        """D."""
        return self.means.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype."""
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        """Parameter device."""
        return self.means.device

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> GaussianMixture:
        """A copy with parameters on ``device`` / in ``dtype``."""
        return GaussianMixture(self.weights, self.means, self.covs,
                               dtype=dtype or self.dtype, device=device or self.device)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(K={self.num_components}, D={self.dim}, "
                f"dtype={self.dtype}, device={self.device})")

    def mean(self) -> torch.Tensor:
        """E[X], ``(D,)``."""
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        """Cov[X], ``(D, D)``."""
        w = self.weights
        mu = self.mean()
        dev = self.means - mu
        return (w[:, None, None] * (self.covs + dev[:, :, None] * dev[:, None, :])).sum(0)

    # ---- densities ----

    def _flat(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"x: expected shape (..., {self.dim}), got {tuple(x.shape)}")
        dtype = torch.promote_types(x.dtype, self.dtype)
        return x.reshape(-1, self.dim).to(dtype), tuple(x.shape[:-1])

    def _components(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For flat x ``(M, D)``: (log π_k N_k ``(K, M)``, x − μ_k ``(K, M, D)``,
        component scores −Σ_k⁻¹(x − μ_k) ``(K, M, D)``)."""
        dtype = xf.dtype
        diff = xf.unsqueeze(0) - self.means.to(dtype).unsqueeze(1)
        pd = torch.matmul(diff, self._prec.to(dtype))  # symmetric precision: (x−μ)ᵀP
        quad = (diff * pd).sum(-1)
        const = self.log_weights.to(dtype) - 0.5 * (self._logdet.to(dtype) + self.dim * _LOG_2PI)
        return const.unsqueeze(1) - 0.5 * quad, diff, -pd

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log π_k + log N(x; μ_k, Σ_k)``, shape ``(..., K)``."""
        xf, lead = self._flat(x)
        lc, _, _ = self._components(xf)
        return lc.transpose(0, 1).reshape(*lead, self.num_components)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities ``p(k | x)``, shape ``(..., K)``."""
        return torch.softmax(self.component_log_prob(x), dim=-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` for ``x`` of shape ``(..., D)``; returns ``(...)``."""
        xf, lead = self._flat(x)
        lc, _, _ = self._components(xf)
        return torch.logsumexp(lc, 0).reshape(lead)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``∇_x log p(x)``, shape ``(..., D)``."""
        return self.log_prob_and_score(x)[1]

    def log_prob_and_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p(x), ∇ log p(x))`` sharing one pass over the components."""
        xf, lead = self._flat(x)
        lc, _, sc = self._components(xf)
        lp = torch.logsumexp(lc, 0)
        w = torch.exp(lc - lp.unsqueeze(0))
        s = (w.unsqueeze(-1) * sc).sum(0)
        return lp.reshape(lead), s.reshape(*lead, self.dim)

    # ---- sampling ----

    def sample(
        self,
        num_samples: int,
        generator: torch.Generator | None = None,
        *,
        return_components: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Exact i.i.d. samples ``(num_samples, D)`` (and their component indices)."""
        comp = torch.multinomial(self.weights, num_samples, replacement=True,
                                 generator=generator)
        z = torch.randn(num_samples, self.dim, dtype=self.dtype, device=self.device,
                        generator=generator)
        x = self.means[comp] + torch.matmul(self._chol[comp], z.unsqueeze(-1)).squeeze(-1)
        return (x, comp) if return_components else x

    # ---- diffusion ----

    def diffused(
        self, schedule: VPSchedule | VESchedule, t: float | torch.Tensor
    ) -> DiffusedGaussianMixture:
        """The exact marginal at diffusion time ``t`` under ``schedule`` (VP or VE).

        Components ``N(m(t) μ_k, m(t)² Σ_k + v(t) I)`` where ``(m, v) = schedule.marginal(t)``.
        """
        m, v = schedule.marginal(float(t))
        return DiffusedGaussianMixture(self, float(m), float(v), t=float(t))

    # ---- tilts ----

    def linear_tilt(self, theta: torch.Tensor) -> Tilt:
        """``p(x) exp(θ·x) / Z``: means ``μ_k + Σ_k θ``, weights ∝ ``π_k exp(θ·μ_k + θᵀΣ_kθ/2)``.

        Returns the tilted mixture and ``log Z = log Σ_k π_k exp(θ·μ_k + θᵀΣ_kθ/2)``.
        """
        theta = self._vector(theta, "theta")
        st = torch.matmul(self.covs, theta)  # (K, D)
        log_c = self.means @ theta + 0.5 * (st @ theta)
        return self._tilt_result(log_c, self.means + st, self.covs)

    def quadratic_tilt(self, a: torch.Tensor, b: torch.Tensor) -> Tilt:
        """``p(x) exp(−½ xᵀAx + bᵀx) / Z`` in closed form.

        ``A`` is ``(D, D)`` (symmetrized) or ``(D,)`` (diagonal); every ``Σ_k⁻¹ + A`` must be
        positive definite. Component k becomes ``N(μ'_k, Σ'_k)`` with ``Σ'_k = (Σ_k⁻¹ + A)⁻¹``,
        ``μ'_k = Σ'_k (Σ_k⁻¹ μ_k + b)``, reweighted by
        ``c_k = sqrt(|Σ'_k| / |Σ_k|) exp(½ μ'_kᵀ Σ'_k⁻¹ μ'_k − ½ μ_kᵀ Σ_k⁻¹ μ_k)``.
        """
        d = self.dim
        a = torch.as_tensor(a).to(device=self.device, dtype=self.dtype)
        if a.dim() == 1 and tuple(a.shape) == (d,):
            a = torch.diag(a)
        if tuple(a.shape) != (d, d):
            raise ValueError(f"a: expected shape ({d}, {d}) or ({d},), got {tuple(a.shape)}")
        a = 0.5 * (a + a.T)
        b = self._vector(b, "b")
        prec_new = self._prec + a
        chol_new = _cholesky(prec_new, "quadratic_tilt: Σ_k⁻¹ + A")
        cov_new = torch.cholesky_inverse(chol_new)
        cov_new = 0.5 * (cov_new + cov_new.transpose(-1, -2))
        eta = torch.matmul(self._prec, self.means.unsqueeze(-1)).squeeze(-1) + b  # (K, D)
        mu_new = torch.matmul(cov_new, eta.unsqueeze(-1)).squeeze(-1)
        logdet_new = -2.0 * torch.log(torch.diagonal(chol_new, dim1=-2, dim2=-1)).sum(-1)
        quad_old = (self.means * torch.matmul(self._prec, self.means.unsqueeze(-1)).squeeze(-1))
        log_c = (0.5 * (logdet_new - self._logdet) + 0.5 * (mu_new * eta).sum(-1)
                 - 0.5 * quad_old.sum(-1))
        return self._tilt_result(log_c, mu_new, cov_new)

    def product(self, other: GaussianMixture) -> Tilt:
        """``p(x) q(x) / Z`` in closed form: a mixture with K1·K2 components.

        Component (i, j) is ``N(μ_ij, Σ_ij)`` with ``Σ_ij = (Σ_i⁻¹ + S_j⁻¹)⁻¹``,
        ``μ_ij = Σ_ij (Σ_i⁻¹ μ_i + S_j⁻¹ ν_j)``, weighted by ``π_i ρ_j N(μ_i; ν_j, Σ_i + S_j)``;
        ``Z = ∫ p q = Σ_ij π_i ρ_j N(μ_i; ν_j, Σ_i + S_j)``. Index (i, j) is ``i·K2 + j``.
        """
        if not isinstance(other, GaussianMixture):
            raise TypeError(f"other: expected a GaussianMixture, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"other: expected dimension {self.dim}, got {other.dim}")
        o = other.to(device=self.device, dtype=self.dtype)
        d = self.dim
        prec = self._prec.unsqueeze(1) + o._prec.unsqueeze(0)  # (K1, K2, D, D)
        chol = _cholesky(prec.reshape(-1, d, d), "product: Σ_i⁻¹ + S_j⁻¹")
        cov = torch.cholesky_inverse(chol)
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        eta = (torch.matmul(self._prec, self.means.unsqueeze(-1)).squeeze(-1).unsqueeze(1)
               + torch.matmul(o._prec, o.means.unsqueeze(-1)).squeeze(-1).unsqueeze(0))
        mu = torch.matmul(cov, eta.reshape(-1, d, 1)).squeeze(-1)
        # log N(μ_i; ν_j, Σ_i + S_j)
        s_sum = (self.covs.unsqueeze(1) + o.covs.unsqueeze(0)).reshape(-1, d, d)
        chol_s = _cholesky(s_sum, "product: Σ_i + S_j")
        diff = (self.means.unsqueeze(1) - o.means.unsqueeze(0)).reshape(-1, d, 1)
        z = torch.linalg.solve_triangular(chol_s, diff, upper=False).squeeze(-1)
        logdet = 2.0 * torch.log(torch.diagonal(chol_s, dim1=-2, dim2=-1)).sum(-1)
        log_c = -0.5 * ((z * z).sum(-1) + logdet + d * _LOG_2PI)
        lw = (self.log_weights.unsqueeze(1) + o.log_weights.unsqueeze(0)).reshape(-1) + log_c
        log_z = torch.logsumexp(lw, 0)
        w = torch.exp(lw - log_z).clamp_min(torch.finfo(self.dtype).tiny)  # far-apart pairs
        return Tilt(GaussianMixture(w, mu, cov, dtype=self.dtype, device=self.device), log_z)

    def power(
        self,
        beta: float,
        *,
        points: int | None = None,
        width: float = 10.0,
        bounds: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> GridTarget:
        """``p(x)^β / Z`` (β > 0) by quadrature on a grid, in 1-D or 2-D.

        See :func:`geometric_product` for ``points``, ``width`` and ``bounds``.
        """
        beta = float(beta)
        if not beta > 0:
            raise ValueError(f"beta: expected a positive exponent, got {beta}")
        return geometric_product([self], [beta], points=points, width=width, bounds=bounds)

    def _box(self, scale: float, width: float) -> tuple[torch.Tensor, torch.Tensor]:
        sd = torch.sqrt(torch.diagonal(self.covs, dim1=-2, dim2=-1) * scale)
        return (self.means - width * sd).min(0).values, (self.means + width * sd).max(0).values

    def _vector(self, v: torch.Tensor, name: str) -> torch.Tensor:
        v = torch.as_tensor(v).to(device=self.device, dtype=self.dtype)
        if tuple(v.shape) != (self.dim,):
            raise ValueError(f"{name}: expected shape ({self.dim},), got {tuple(v.shape)}")
        return v

    def _tilt_result(self, log_c: torch.Tensor, means: torch.Tensor, covs: torch.Tensor) -> Tilt:
        lw = self.log_weights + log_c
        log_z = torch.logsumexp(lw, 0)
        return Tilt(GaussianMixture(torch.exp(lw - log_z), means, covs, dtype=self.dtype,
                                    device=self.device), log_z)


def mixture_product(mixtures: Sequence[GaussianMixture]) -> Tilt:
    """``Π_k p_k(x) / Z`` for one or more mixtures, in closed form (Π_k K_k components);
    ``log Z = log ∫ Π_k p_k``."""
    mixtures = list(mixtures)
    if not mixtures:
        raise ValueError("mixtures: expected at least one GaussianMixture")
    out = mixtures[0]
    log_z = torch.zeros((), dtype=out.dtype, device=out.device)
    for m in mixtures[1:]:
        t = out.product(m)
        out, log_z = t.mixture, log_z + t.log_z
    return Tilt(out, log_z)


class GridTarget:
    """An unnormalized density ``f`` on a regular grid in 1-D or 2-D: log Z by the midpoint
    rule (grid log-sum-exp), moments, and an (almost exact) sampler.

    Args:
        log_density: ``log f(x)`` for ``x`` of shape ``(M, D)``, returning ``(M,)``.
        lower, upper: the box ``(D,)``; ``f`` must be negligible outside it (checked on the
            boundary cells: at least ``e^-30`` below the maximum).
        points: grid points per dimension.

    Attributes:
        log_z: ``log ∫ f`` (0-dim float64 tensor).
        points: the cell centres ``(M, D)``; log_probs: normalized log cell masses ``(M,)``.
        cell: the cell widths ``(D,)``.
    """

    def __init__(
        self,
        log_density: Callable[[torch.Tensor], torch.Tensor],
        lower: Sequence[float] | torch.Tensor,
        upper: Sequence[float] | torch.Tensor,
        points: int,
    ) -> None:
        lower = torch.as_tensor(lower, dtype=torch.float64).reshape(-1)
        upper = torch.as_tensor(upper, dtype=torch.float64).reshape(-1)
        d = lower.numel()
        if d not in (1, 2) or upper.shape != lower.shape:
            raise ValueError(f"GridTarget: expected 1-D or 2-D bounds of equal shape, got "
                             f"{tuple(lower.shape)} and {tuple(upper.shape)}")
        if not bool((upper > lower).all()):
            raise ValueError("GridTarget: expected upper > lower in every dimension")
        points = int(points)
        if points < 3:
            raise ValueError(f"points: expected at least 3 per dimension, got {points}")
        self.dim = d
        self.cell = (upper - lower) / points
        axes = [lower[i] + (torch.arange(points, dtype=torch.float64) + 0.5) * self.cell[i]
                for i in range(d)]
        grid = torch.meshgrid(*axes, indexing="ij")
        self.points = torch.stack([g.reshape(-1) for g in grid], -1)
        chunks = [log_density(c).reshape(-1).double()
                  for c in torch.split(self.points, 1 << 16)]
        log_f = torch.cat(chunks)
        self._log_density = log_density
        top = float(torch.nan_to_num(log_f, nan=-math.inf).max())
        if not math.isfinite(top):
            raise ValueError("GridTarget: the density is zero, infinite or NaN on the grid")
        edge = log_f.reshape([points] * d)
        rim = torch.cat([edge.select(i, j).reshape(-1) for i in range(d) for j in (0, -1)])
        if float(rim.max()) > top - 30.0:
            raise ValueError("GridTarget: the density is not negligible at the boundary of the "
                             "grid (widen the bounds)")
        log_cell = float(torch.log(self.cell).sum())
        lse = torch.logsumexp(log_f, 0)
        self.log_z = lse + log_cell
        self.log_probs = log_f - lse

    @property
    def probs(self) -> torch.Tensor:
        """Normalized cell masses ``(M,)``."""
        return self.log_probs.exp()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log f(x) − log Z`` for ``x`` ``(..., D)``."""
        lead = x.shape[:-1]
        return (self._log_density(x.reshape(-1, self.dim).double()) - self.log_z).reshape(lead)

    def expectation(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``E[fn(X)]`` by the same quadrature (``fn`` maps ``(M, D)`` to ``(M, ...)``)."""
        vals = fn(self.points)
        w = self.probs.reshape(-1, *([1] * (vals.dim() - 1)))
        return (w * vals).sum(0)

    def mean(self) -> torch.Tensor:
        """E[X], ``(D,)``."""
        return self.expectation(lambda x: x)

    def covariance(self) -> torch.Tensor:
        """Cov[X], ``(D, D)``."""
        mu = self.mean()
        dev = self.points - mu
        return self.expectation(lambda x: dev.unsqueeze(-1) * dev.unsqueeze(-2))

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples ``(num_samples, D)``: a cell by its mass, then uniform within the cell
        (exact up to the density's variation within a cell)."""
        idx = torch.multinomial(self.probs, num_samples, replacement=True, generator=generator)
        u = torch.rand(num_samples, self.dim, dtype=torch.float64, generator=generator) - 0.5
        return self.points[idx] + u * self.cell


def geometric_product(
    mixtures: Sequence[GaussianMixture],
    betas: Sequence[float],
    *,
    points: int | None = None,
    width: float = 10.0,
    bounds: tuple[Sequence[float], Sequence[float]] | None = None,
) -> GridTarget:
    """``Π_k p_k(x)^{β_k} / Z`` in 1-D or 2-D by quadrature on a grid: tempering (one mixture),
    products of experts, classifier-free guidance (β = (w, 1 − w), w > 1).

    Args:
        mixtures: the factors (same dimension, 1 or 2).
        betas: one real exponent each; at least one positive. ``Z`` must be finite (with a
            negative exponent the positive factors must dominate in the tails).
        points: grid points per dimension (default 4001 in 1-D, 801 in 2-D).
        width: the default box spans every component of the positive-β factors to
            ``width`` standard deviations of ``N(μ, Σ/β)``.
        bounds: an explicit box ``(lower, upper)``, each ``(D,)``.
    """
    mixtures, betas = list(mixtures), [float(b) for b in betas]
    if not mixtures or len(betas) != len(mixtures):
        raise ValueError(f"betas: expected one exponent per mixture ({len(mixtures)}), "
                         f"got {len(betas)}")
    d = mixtures[0].dim
    if d not in (1, 2) or any(m.dim != d for m in mixtures):
        raise ValueError("mixtures: expected factors of one common dimension, 1 or 2")
    if not any(b > 0 for b in betas):
        raise ValueError(f"betas: expected at least one positive exponent, got {betas}")
    if bounds is None:
        boxes = [m._box(1.0 / b, width) for m, b in zip(mixtures, betas, strict=True) if b > 0]
        lower = torch.stack([b[0] for b in boxes]).min(0).values
        upper = torch.stack([b[1] for b in boxes]).max(0).values
    else:
        lower, upper = bounds
    if points is None:
        points = 4001 if d == 1 else 801

    def log_density(x: torch.Tensor) -> torch.Tensor:
        return sum(b * m.log_prob(x) for m, b in zip(mixtures, betas, strict=True))

    return GridTarget(log_density, lower, upper, points)


class DiffusedGaussianMixture(GaussianMixture):
    """The marginal of a :class:`GaussianMixture` at diffusion time t: ``X_t = m X_0 + √v ε``.

    A mixture itself (components ``N(m μ_k, m² Σ_k + v I)``), plus the posterior of the clean
    point: :meth:`posterior_mean` (Tweedie's E[X_0 | X_t = x]) and
    :meth:`posterior_mean_grad` (``∇_x θ·E[X_0 | X_t = x]``), both exact.

    Attributes:
        base: the data mixture (t = 0).
        m, v: the schedule's mean coefficient and variance at t.
        t: the diffusion time (NaN when built directly from ``m`` and ``v``).
    """

    def __init__(self, base: GaussianMixture, m: float, v: float, t: float = math.nan) -> None:
        if not (m > 0 and v >= 0):
            raise ValueError(f"DiffusedGaussianMixture: need m > 0 and v >= 0, got m={m}, v={v}")
        eye = torch.eye(base.dim, dtype=base.dtype, device=base.device)
        # m² Σ_k + v I is SPD whenever Σ_k is: no data-dependent (host-syncing) checks per t
        super().__init__(base.weights, m * base.means, m * m * base.covs + v * eye,
                         dtype=base.dtype, device=base.device, validate=False)
        self.base = base
        self.m, self.v, self.t = float(m), float(v), float(t)
        # Kalman gain of X_0 | X_t within component k: G_k = m Σ_k (m² Σ_k + v I)⁻¹.
        self._gain = m * torch.matmul(base.covs, self._prec)

    def _posterior(self, x: torch.Tensor):
        xf, lead = self._flat(x)
        lc, diff, sc = self._components(xf)
        lp = torch.logsumexp(lc, 0)
        log_w = lc - lp
        w = torch.exp(log_w)  # responsibilities (K, M)
        gain = self._gain.to(xf.dtype)
        # μ_post_k(x) = μ_k + G_k (x − m μ_k); diff = x − m μ_k.
        mu_post = self.base.means.to(xf.dtype).unsqueeze(1) + torch.matmul(
            diff, gain.transpose(-1, -2))
        return xf, lead, w, sc, mu_post, gain, lp, log_w

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Tweedie's ``E[X_0 | X_t = x] = (x + v ∇log p_t(x)) / m``, exact, shape ``(..., D)``."""
        _, lead, w, _, mu_post, _, _, _ = self._posterior(x)
        return (w.unsqueeze(-1) * mu_post).sum(0).reshape(*lead, self.dim)

    def posterior_mean_grad(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``∇_x θ·E[X_0 | X_t = x]`` (= (m/v) Cov[X_0 | X_t = x] θ), shape ``(..., D)``.

        The gradient of the reward ``θ·x̂_0(x)`` used as a guidance term; finite at v = 0.
        """
        grad = self.log_prob_score_reward(x, theta, grad=True)[3]
        assert grad is not None
        return grad

    def log_prob_score_reward(
        self, x: torch.Tensor, theta: torch.Tensor, *, grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(log p_t(x), ∇log p_t(x), θ·E[X_0 | X_t = x], its gradient or None)`` in one pass
        over the components (what a reward-tilting sampler needs per step)."""
        xf, lead, w, sc, mu_post, gain, lp, _ = self._posterior(x)
        theta = self._vector(theta, "theta").to(xf.dtype)
        s_bar = (w.unsqueeze(-1) * sc).sum(0)  # (M, D)
        r_k = mu_post @ theta  # (K, M)
        r = (w * r_k).sum(0)
        g = None
        if grad:  # Σ_k ∇(w_k θ·μ_post_k), ∇w_k = w_k (s_k − s̄), ∇μ_post_k = G_k
            gt = gain.transpose(-1, -2) @ theta
            g = (w.unsqueeze(-1) * (gt.unsqueeze(1) + r_k.unsqueeze(-1)
                                    * (sc - s_bar.unsqueeze(0)))).sum(0)
            g = g.reshape(*lead, self.dim)
        return lp.reshape(lead), s_bar.reshape(*lead, self.dim), r.reshape(lead), g

    def log_prob_score_value(
        self, x: torch.Tensor, theta: torch.Tensor, *, grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(log p_t(x), ∇log p_t(x), V_t(x), ∇V_t(x) or None)`` in one pass, where
        ``V_t(x) = log E[exp(θ·X_0) | X_t = x]`` is the exact soft value of the linear reward.

        Component k of X_0 | X_t = x is ``N(μ_post_k(x), S_k)``, so
        ``V_t = log Σ_k w_k(x) exp(θ·μ_post_k(x) + ½ θᵀS_kθ)`` and
        ``∇V_t = Σ_k ŵ_k (s_k − s̄ + G_kᵀθ)`` with ``ŵ_k ∝ w_k exp(θ·μ_post_k + ½ θᵀS_kθ)``.
        ``p_t exp(V_t)`` is Z times the diffused tilted mixture.
        """
        xf, lead, w, sc, mu_post, gain, lp, log_w = self._posterior(x)
        theta = self._vector(theta, "theta").to(xf.dtype)
        s_bar = (w.unsqueeze(-1) * sc).sum(0)  # (M, D)
        base_cov = self.base.covs.to(xf.dtype)
        post_cov = base_cov - self.m * torch.matmul(gain, base_cov)  # S_k = Σ_k − G_k m Σ_k
        half_var = 0.5 * ((post_cov @ theta) @ theta)  # (K,)
        log_c = log_w + mu_post @ theta + half_var.unsqueeze(1)  # (K, M)
        value = torch.logsumexp(log_c, 0)
        g = None
        if grad:
            wh = torch.exp(log_c - value)
            gt = gain.transpose(-1, -2) @ theta
            g = (wh.unsqueeze(-1) * (sc - s_bar.unsqueeze(0) + gt.unsqueeze(1))).sum(0)
            g = g.reshape(*lead, self.dim)
        return lp.reshape(lead), s_bar.reshape(*lead, self.dim), value.reshape(lead), g

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> DiffusedGaussianMixture:
        """A copy with parameters on ``device`` / in ``dtype``."""
        return DiffusedGaussianMixture(self.base.to(device, dtype), self.m, self.v, self.t)


def default_2d(device: torch.device | str | None = None) -> GaussianMixture:
    """The demo's 2-D mixture: six well-separated components on a hexagon of radius 4.

    Asymmetric weights (0.30 … 0.05), mixed diagonal and correlated covariances. Under the
    demo's tilt the mass moves to the two lightest-but-one components on the right.
    """
    ang = torch.arange(6, dtype=torch.float64) * (math.pi / 3.0) + math.pi  # start at (−4, 0)
    means = 4.0 * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    weights = torch.tensor([0.30, 0.22, 0.18, 0.12, 0.13, 0.05], dtype=torch.float64)
    covs = torch.tensor([
        [[0.40, 0.00], [0.00, 0.40]],
        [[0.30, 0.15], [0.15, 0.35]],
        [[0.50, -0.20], [-0.20, 0.30]],
        [[0.25, 0.00], [0.00, 0.60]],
        [[0.35, 0.18], [0.18, 0.35]],
        [[0.20, 0.00], [0.00, 0.20]],
    ], dtype=torch.float64)
    return GaussianMixture(weights, means, covs, device=device)
