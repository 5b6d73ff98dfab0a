"""Particle-system Boltzmann targets: DW-4 and LJ-13, with a Gaussian centre of mass.

Both are the benchmark systems of Köhler, Klein & Noé, "Equivariant Flows: exact likelihood
generative learning for symmetric densities", ICML 2020, as used by later samplers (the
SE(3)-augmented coupling flows of Midgley et al. 2023, trained with FAB; DEM; iDEM). A state is
``x = (x_1, ..., x_n)``, ``n`` particles in ``R^d``, flattened to ``D = n·d`` (particle-major:
``x.reshape(..., n, d)``); ``d_ij = |x_i − x_j|``, ``x̄ = (1/n) Σ_i x_i``.

- :class:`DoubleWell4` (DW-4; n = 4, d = 2, D = 8): a double-well pair potential,
  ``E_int(x) = (1/(2τ)) Σ_{i≠j} f(d_ij) = (1/τ) Σ_{i<j} f(d_ij)``,
  ``f(r) = a (r − d₀) + b (r − d₀)² + c (r − d₀)⁴`` with ``a = 0, b = −4, c = 0.9, d₀ = 4,
  τ = 1``. Each pair prefers ``d_ij ≈ 2.51`` or ``≈ 5.49`` (``f = −4.44`` at both).
- :class:`LennardJones13` (LJ-13; n = 13, d = 3, D = 39): the Lennard-Jones cluster plus a
  harmonic trap on the internal coordinates,
  ``E_int(x) = (ε/(2τ)) Σ_{i≠j} [(r_m/d_ij)¹² − 2 (r_m/d_ij)⁶] + c Σ_i |x_i − x̄|²`` with
  ``ε = 1, r_m = 1, τ = 1, c = 0.5``.

**Convention (checked against the reference code).** The paper writes both pair sums over all
ordered pairs with the prefactor ``1/(2τ)``, i.e. each unordered pair counts once with weight
``1/τ``. That is what bgflow (the authors' library) computes: ``MultiDoubleWellPotential`` in its
own form ``a u⁴ + b u² + c`` with ``(a, b, c, offset) = (0.9, −4, 0, 4)`` (as DEM/iDEM
instantiate it) over the unordered distances; ``LennardJonesPotential`` summing ordered pairs and
halving, plus the oscillator ``0.5·oscillator_scale·Σ|x_i − x̄|²`` with scale 1. The
SE(3)-augmented-coupling-flow code writes both with ``1/(2τ)`` over ordered pairs and
``harmonic_potential_coef = 0.5``, the same energies. Note that DEM/iDEM's "LJ13_efm" variant
counts every LJ pair twice (their ``energy_factor = 1``), so its energies are not these;
``tau = 0.5`` reproduces it (τ divides the pair term only, not the harmonic one).

**Centre of mass.** ``E_int`` is translation invariant, so ``exp(−E_int)`` is not integrable
on ``R^D``. These targets add a Gaussian confinement of the centre of mass,

    E(x) = E_int(x) + |x̄|² / (2 s²),        log γ(x) = −E(x),

with ``s = com_std``. Change variables ``x ↦ (u_0, y)`` with an orthogonal ``Q`` (n×n, acting on
the particle index, first row ``(1, ..., 1)/√n``): ``u_0 = √n·x̄ ∈ R^d`` and ``y ∈ R^{(n−1)d}``
orthonormal coordinates of the zero-COM subspace ``{Σ_i x_i = 0}``. The Jacobian is 1, ``E_int``
depends on ``y`` only and the COM term on ``u_0`` only, so the density factorizes: **x̄ is exactly
``N(0, s² I_d)`` and independent of the internal coordinates**, whose law is ``exp(−E_int)`` on
the zero-COM subspace. With ``du_0 = n^{d/2} dx̄``,

    log Z = log Z_int + (d/2)·log(2π n s²),    Z_int = ∫_{Σx_i=0} exp(−E_int) dλ_{(n−1)d},

``λ_{(n−1)d}`` the Lebesgue measure the subspace inherits from ``R^D`` (the usual zero-COM
normalizer of E(n)-equivariant flows). So ``log_z`` here is for the confined density and differs
from the internal normalizer ``log_z_internal`` by the exact constant :attr:`log_z_com`.
Default ``s = 1/√n``: the orthonormal COM coordinate ``√n·x̄`` is then standard normal, exactly
its law under the samplers' default ``N(0, I_D)`` reference (the mean of n i.i.d. ``N(0, I_d)``
particles is ``N(0, I_d/n)``), so annealing spends nothing on the COM directions, and
``log_z_com = (d/2)·log 2π``.

**Reference values.** ``log Z_int`` is not known in closed form. ``log_z_internal``,
:attr:`log_z_se` and :attr:`reference` (mean internal energy ``E[E_int]`` and mean pair distance
``E[mean_{i<j} d_ij]`` with standard errors) are estimates from long adaptive annealed-SMC runs,
``bench/reference_values.py`` → ``bench/results/reference-values.json`` (log Ẑ pooled as
``log mean_b Ẑ_b`` over independent rows, delta-method standard error; observables as the mean
over rows of each row's weighted average, standard error from their spread). They hold for the
default potential constants only (any ``com_std`` is fine: the COM part is exact); with other
constants ``log_z``, ``log_z_se`` and the reference entries are NaN. The standard errors cover
the spread over rows only: the adaptive schedule and step size add an O(1/N) bias, and slow
MCMC mixing makes Ẑ heavy-tailed, so a spread-based standard error can be optimistic. The JSON's
second run with quite different settings (particles, CESS target, MALA moves) probes both.
DW-4: it agrees within 0.7 combined standard errors. LJ-13: a short run disagrees by ≈ 2
combined standard errors, a third long run agrees with the first within 0.3 (log Z); the longest
run's numbers are used (details at the class constants).
``E[E_com] = d/2`` exactly, so ``E[energy(x)] = E[E_int] + d/2``.

Singularities: coincident LJ particles (``d_ij = 0``) have ``E = +∞``: ``log γ = −∞`` and a zero
gradient (never NaN); so does any configuration whose energy or gradient overflows the dtype
(its density underflows anyway). DW-4 is finite everywhere; at coincident particles the pair's
gradient (a cone's subgradient) is taken as 0.
"""

from __future__ import annotations

import math

import torch

from pathsmc.targets.boltzmann import BoltzmannTarget

__all__ = ["ParticleSystem", "DoubleWell4", "LennardJones13"]

_LOG_2PI = math.log(2.0 * math.pi)
_NAN = float("nan")


class ParticleSystem(BoltzmannTarget):
    """``n`` particles in ``R^d`` with a translation-invariant ``E_int`` and a Gaussian COM.

    Subclasses implement :meth:`_pair_terms` (pair energy and ``f'(r)/r`` from squared
    distances) and may add a one-body term in :meth:`_extra`. See the module docstring for the
    COM construction and the meaning of ``log_z``.

    Attributes:
        n_particles, spatial_dim: n and d (``dim = n·d``).
        com_std: s, the standard deviation of each coordinate of x̄.
        log_z_com: the exact COM part ``(d/2)·log(2π n s²)``.
        log_z_internal: reference estimate of ``log Z_int`` (NaN for non-default constants).
        log_z: ``log_z_internal + log_z_com``.
        log_z_se: standard error of ``log_z`` (that of the reference estimate).
        reference: ``{"mean_energy", "mean_energy_se", "mean_distance", "mean_distance_se"}``:
            ``E[E_int]`` and ``E[mean_{i<j} d_ij]`` with standard errors.
    """

    n_particles: int
    spatial_dim: int

    # Filled by subclasses for their default constants (see bench/reference_values.py).
    _REFERENCE_LOG_Z_INTERNAL: float = _NAN
    _REFERENCE_LOG_Z_SE: float = _NAN
    _REFERENCE_OBSERVABLES: dict[str, float] = {}

    def _init_common(self, n: int, d: int, com_std: float | None, is_default: bool) -> None:
        self.n_particles, self.spatial_dim = int(n), int(d)
        self.dim = self.n_particles * self.spatial_dim
        self.com_std = 1.0 / math.sqrt(n) if com_std is None else float(com_std)
        if not self.com_std > 0:
            raise ValueError(f"com_std: expected > 0, got {com_std}")
        self.log_z_com = 0.5 * d * (_LOG_2PI + math.log(n * self.com_std**2))
        if is_default:
            self.log_z_internal = self._REFERENCE_LOG_Z_INTERNAL
            self.log_z_se = self._REFERENCE_LOG_Z_SE
            self.reference = dict(self._REFERENCE_OBSERVABLES)
        else:
            self.log_z_internal = _NAN
            self.log_z_se = _NAN
            self.reference = {k: _NAN for k in self._REFERENCE_OBSERVABLES}
        self.log_z = self.log_z_internal + self.log_z_com
        iu = torch.triu_indices(n, n, offset=1)
        # Incidence matrix of the pairs i < j: (M x)_p = x_i − x_j.
        m = torch.zeros(iu.shape[1], n, dtype=torch.float64)
        m[torch.arange(iu.shape[1]), iu[0]] = 1.0
        m[torch.arange(iu.shape[1]), iu[1]] = -1.0
        self._incidence = m
        self._incidence_cache: dict = {}

    def _m(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.dtype, x.device)
        if key not in self._incidence_cache:
            m = self._incidence.to(dtype=x.dtype, device=x.device)
            self._incidence_cache[key] = (m, m.t().contiguous())
        return self._incidence_cache[key]

    # ---- geometry ----

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., D)`` as ``(..., n, d)`` (a view)."""
        self._check(x)
        return x.reshape(*x.shape[:-1], self.n_particles, self.spatial_dim)

    def center_of_mass(self, x: torch.Tensor) -> torch.Tensor:
        """``x̄`` ``(..., d)``."""
        return self.positions(x).mean(-2)

    def remove_com(self, x: torch.Tensor) -> torch.Tensor:
        """``x − x̄`` per particle, ``(..., D)``."""
        p = self.positions(x)
        return (p - p.mean(-2, keepdim=True)).reshape(x.shape)

    def pairwise_distances(self, x: torch.Tensor) -> torch.Tensor:
        """``d_ij`` for the ``n(n−1)/2`` pairs ``i < j`` (row-major), ``(..., n(n−1)/2)``."""
        p = self.positions(x)
        return (self._m(p)[0] @ p).norm(dim=-1)  # rows of M: x_i − x_j (cached per device)

    # ---- energy ----

    def _pair_terms(self, r2: torch.Tensor):
        """``(f(d), f'(d)/d, infinite)`` from the squared distances ``r2`` ``(..., P)`` of the
        ``P = n(n−1)/2`` pairs i < j: the pair energy ``f`` (so that ``E_pair = Σ_{i<j} f``),
        the gradient weight and a ``(...)`` flag for configurations of infinite energy."""
        raise NotImplementedError

    def _extra(self, centered: torch.Tensor):
        """One-body internal term ``(energy (...), gradient (..., n, d))`` of the centred
        positions, or None."""
        return None

    def _internal(self, p: torch.Tensor):
        """``(E_int (...), ∇E_int (..., n, d), infinite (...))`` for positions ``(..., n, d)``.

        Coordinate-major layout: with ``q = p^T`` ``(..., d, n)`` the pair differences are
        ``q Mᵀ`` ``(..., d, P)`` and ``∇_{x_i} Σ_p f(d_p) = Σ_p f'(d_p)/d_p·(M_{p i})(x_i − x_j)``
        is ``(w·diff) M``: two small matmuls and contiguous elementwise work over P.
        """
        m, mt = self._m(p)
        q = p.transpose(-1, -2)
        diff = q @ mt  # (..., d, P): x_i − x_j for pair p = (i, j)
        r2 = (diff * diff).sum(-2)
        f, w, infinite = self._pair_terms(r2)
        e = f.sum(-1)
        g = ((w.unsqueeze(-2) * diff) @ m).transpose(-1, -2)  # (..., n, d)
        extra = self._extra(p - p.mean(-2, keepdim=True))
        if extra is not None:
            e = e + extra[0]
            g = g + extra[1]
        return e, g, infinite

    def internal_energy(self, x: torch.Tensor) -> torch.Tensor:
        """``E_int(x)`` (without the COM term), ``(...)``; ``+∞`` at LJ collisions."""
        e, _, infinite = self._internal(self.positions(x))
        return torch.where(infinite, torch.full_like(e, math.inf), e)

    def log_prob_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.positions(x)
        e, g, infinite = self._internal(p)
        com = p.mean(-2)  # (..., d)
        s2 = self.com_std**2
        e = e + 0.5 * (com * com).sum(-1) / s2
        g = g + (com / (self.n_particles * s2)).unsqueeze(-2)
        lp = -e
        grad = -g.reshape(x.shape)
        # Collisions and overflow: log γ = −∞ with a zero gradient (NaN inputs stay NaN).
        bad = infinite | torch.isinf(e) | (~torch.isfinite(grad).all(-1) & ~torch.isnan(x).any(-1))
        lp = torch.where(bad, torch.full_like(lp, -math.inf), lp)
        grad = torch.where(bad.unsqueeze(-1), torch.zeros_like(grad), grad)
        return lp, grad

    def sample(self, shape: int | tuple[int, ...],
               generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no exact sampler (only the centre of mass, "
            f"N(0, {self.com_std:.4g}² I_{self.spatial_dim}), is known in closed form); use "
            "pathsmc.samplers.annealed_smc or pathsmc.tempering to draw weighted samples")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dim={self.dim}, log_z={self.log_z:.4f} ± "
                f"{self.log_z_se:.4f}, com_std={self.com_std:.4g})")


class DoubleWell4(ParticleSystem):
    """DW-4: 4 particles in 2-D (D = 8) with the pairwise double well of Köhler et al. (2020).

    ``E(x) = (1/τ) Σ_{i<j} [a (d_ij − d₀) + b (d_ij − d₀)² + c (d_ij − d₀)⁴] + |x̄|²/(2 s²)``.

    Args:
        a, b, c, d0, tau: the potential (defaults 0, −4, 0.9, 4, 1).
        n_particles, spatial_dim: 4 and 2 (other values give a multi-double-well system
            without reference values).
        com_std: s, the standard deviation of each coordinate of the centre of mass (default
            ``1/√n``, see the module docstring).
    """

    # Reference values for the default constants: bench/reference_values.py, "main" run in
    # bench/results/reference-values.json (annealed SMC, 32 rows × 4096 particles, CESS 0.95,
    # 50 MALA moves per temperature); the "check" run (2048 particles, CESS 0.99, 20 moves)
    # agrees within 0.7 combined standard errors on every number.
    _REFERENCE_LOG_Z_INTERNAL = 29.6693
    _REFERENCE_LOG_Z_SE = 0.0038
    _REFERENCE_OBSERVABLES = {"mean_energy": -22.5412, "mean_energy_se": 0.0052,
                              "mean_distance": 4.04557, "mean_distance_se": 0.0014}

    def __init__(self, *, a: float = 0.0, b: float = -4.0, c: float = 0.9, d0: float = 4.0,
                 tau: float = 1.0, n_particles: int = 4, spatial_dim: int = 2,
                 com_std: float | None = None) -> None:
        if not c > 0 or not tau > 0:
            raise ValueError(f"c and tau must be > 0, got c={c}, tau={tau}")
        self.a, self.b, self.c, self.d0, self.tau = float(a), float(b), float(c), float(d0), \
            float(tau)
        default = ((self.a, self.b, self.c, self.d0, self.tau, n_particles, spatial_dim)
                   == (0.0, -4.0, 0.9, 4.0, 1.0, 4, 2))
        self._init_common(n_particles, spatial_dim, com_std, default)

    def _pair_terms(self, r2):
        r = torch.sqrt(r2)
        u = r - self.d0
        u2 = u * u
        f = (self.a * u + self.b * u2 + self.c * u2 * u2) / self.tau
        df = (self.a + 2.0 * self.b * u + 4.0 * self.c * u2 * u) / self.tau
        # Coincident particles: the pair's (cone) gradient is taken as 0, never 0/0.
        pos = r > 0
        w = torch.where(pos, df / torch.where(pos, r, torch.ones_like(r)), torch.zeros_like(r))
        infinite = torch.zeros(r2.shape[:-1], dtype=torch.bool, device=r2.device)
        return f, w, infinite


class LennardJones13(ParticleSystem):
    """LJ-13: 13 Lennard-Jones particles in 3-D (D = 39) in a harmonic trap (Köhler et al.).

    ``E(x) = (ε/τ) Σ_{i<j} [(r_m/d_ij)¹² − 2 (r_m/d_ij)⁶] + c Σ_i |x_i − x̄|² + |x̄|²/(2 s²)``.

    Args:
        eps, rm, tau: the LJ well depth, the distance of its minimum and the temperature
            (defaults 1, 1, 1).
        oscillator: c, the harmonic coefficient on the centred positions (default 0.5, bgflow's
            ``0.5 · oscillator_scale`` with scale 1).
        n_particles, spatial_dim: 13 and 3 (other values: an LJ cluster without reference
            values).
        com_std: s, the standard deviation of each coordinate of the centre of mass (default
            ``1/√n``, see the module docstring).
    """

    # Reference values for the default constants: bench/reference_values.py, "check2" run in
    # bench/results/reference-values.json (the longest: annealed SMC, 32 rows × 1024
    # particles, CESS 0.97, 40 MALA moves per temperature). The "main" run (CESS 0.9, 80 moves)
    # agrees within 0.3 (log Z) and 1.4 (observables) combined standard errors; the short
    # "check" run (16 rows, CESS 0.98, 20 moves) is 2.1 se higher in log Z (2.2 lower in
    # mean distance), so these standard errors may be somewhat optimistic.
    _REFERENCE_LOG_Z_INTERNAL = 39.2622
    _REFERENCE_LOG_Z_SE = 0.0115
    _REFERENCE_OBSERVABLES = {"mean_energy": 0.613, "mean_energy_se": 0.055,
                              "mean_distance": 2.0849, "mean_distance_se": 0.0017}

    def __init__(self, *, eps: float = 1.0, rm: float = 1.0, tau: float = 1.0,
                 oscillator: float = 0.5, n_particles: int = 13, spatial_dim: int = 3,
                 com_std: float | None = None) -> None:
        if not eps > 0 or not rm > 0 or not tau > 0 or not oscillator >= 0:
            raise ValueError("eps, rm, tau must be > 0 and oscillator >= 0")
        self.eps, self.rm, self.tau, self.oscillator = float(eps), float(rm), float(tau), \
            float(oscillator)
        default = ((self.eps, self.rm, self.tau, self.oscillator, n_particles, spatial_dim)
                   == (1.0, 1.0, 1.0, 0.5, 13, 3))
        self._init_common(n_particles, spatial_dim, com_std, default)

    def _pair_terms(self, r2):
        # In s = r_m²/r²: f = k (s⁶ − 2 s³), f'(r)/r = 2 df/d(r²) = −12 k (s⁶ − s³)/r², k = ε/τ.
        hit = r2 == 0
        infinite = hit.any(-1)
        safe = torch.where(hit, torch.ones_like(r2), r2)
        s = self.rm**2 / safe
        s3 = s * s * s
        k = self.eps / self.tau
        f = k * s3 * (s3 - 2.0)  # so that s3 = inf gives +inf, never inf − inf
        w = (-12.0 * k) * s3 * (s3 - 1.0) / safe
        return f, w, infinite

    def _extra(self, centered):
        if self.oscillator == 0.0:
            return None
        # c Σ|x_i − x̄|²; its gradient is 2c (x_i − x̄) (the x̄-dependence cancels: Σ(x_i − x̄) = 0).
        c = self.oscillator
        return c * (centered * centered).sum((-2, -1)), (2.0 * c) * centered
