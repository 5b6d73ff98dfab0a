"""SMC over a population split across processes (GPUs or machines) with ``torch.distributed``.

Each rank of a process group holds ``N_local`` particles of every row; together they are one
population of ``N = world_size · N_local`` particles per row (global particle ``r·N_local + i``
is particle ``i`` of rank ``r``). The per-particle work (the model's proposal and weights, the
``em_step`` / ``kernel_logpdf`` / ``mala_accept`` ops) stays on each rank; only the
population-level steps talk to the other ranks:

- :meth:`DistributedOps.normalize`: global logsumexp, log Ẑ increment and ESS from the fused
  op on each rank's slice plus an all-gather of two numbers per row and rank;
- :meth:`DistributedOps.adaptive_resample`: the rows whose *global* ESS < threshold·N resample
  the whole population: the log-weights are all-gathered, rank 0 draws the ancestors with the
  single-process op (so every edge case — dead rows, NaN weights, the schemes — behaves as it
  does there) and broadcasts them, and each rank all-gathers the state tensors and takes its
  slice. Particles move between ranks: a rank whose particles all had negligible weight is
  refilled with copies of the others'.

Nothing is read back to the host inside the loop (collectives work on device tensors), so the
loop keeps the single-process driver's no-sync property. Collectives are issued in the same
order on every rank; every rank must run the same number of steps with the same B and N_local.

:func:`smc` is :func:`pathsmc.smc.smc` over a process group, :func:`annealed_smc` is
:func:`pathsmc.samplers.annealed_smc` over one (adaptive tempering on the global population),
:class:`DistributedParallelTempering` splits parallel tempering's chains across ranks.
Use the NCCL backend for CUDA tensors (one GPU per rank) and gloo for CPU tensors. Each rank
passes its own generator (seeded differently, e.g. ``seed + rank``): the ranks' particles must
be independent. Launch with ``torchrun --nproc-per-node G your_script.py``; a worked example
with an exact answer is ``examples/distributed_smc.py`` in the repository.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pathsmc import ops as fused_ops
from pathsmc.progress import progress_bar
from pathsmc.samplers import AnnealedSMCResult
from pathsmc.smc import (
    FeynmanKacModel,
    SMCResult,
    check_run_args,
    dead_rows,
    run_loop,
    weights_from_log_norm,
)
from pathsmc.tempering import ParallelTempering, PTResult

__all__ = ["DistributedOps", "DistributedParallelTempering", "DistributedSMCResult",
           "annealed_smc", "main", "smc"]


class DistributedOps:
    """The population ops of :mod:`pathsmc.ops` over a population split evenly across the
    ranks of a process group (see the module docstring). Every other op (``em_step``,
    ``kernel_logpdf``, ``mala_accept``, ...) is the base module's, run on the local particles.

    Args:
        group: the process group (default: the default group; it must be initialized).
        base: the single-process ops (default :mod:`pathsmc.ops`; :mod:`pathsmc.reference`
            for pure PyTorch).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, base=None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("pathsmc.distributed: torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group first (or launch with "
                               "torchrun)")
        self.group = group
        self.base = fused_ops if base is None else base
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def __getattr__(self, name: str):
        # Per-particle ops need no communication: the base module's, on the local slice.
        return getattr(self.base, name)

    # ---- communication helpers (device tensors only: no host reads) ----

    def _gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, N_local, ...)`` on every rank -> ``(B, N, ...)``, rank-major along dim 1."""
        send = t.contiguous()
        parts = [torch.empty_like(send) for _ in range(self.world_size)]
        dist.all_gather(parts, send, group=self.group)
        return torch.cat(parts, dim=1)

    @property
    def _root(self) -> int:
        """The global rank of the group's rank 0 (collectives name global ranks)."""
        return dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, src=self._root, group=self.group)
        return t

    def _slice(self, t: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s slice ``(B, N_local, ...)`` of a global ``(B, N, ...)`` tensor."""
        n_local = t.shape[1] // self.world_size
        return t[:, rank * n_local:(rank + 1) * n_local]

    # ---- the population ops ----

    def normalize(self, logw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row-wise ``(log normalized weights (B, N_local), log mean weight (B,), ESS (B,))``
        over the global population, as :func:`pathsmc.ops.normalize` on all N particles."""
        if logw.dim() != 2:
            raise ValueError(f"logw: expected (B, N_local), got shape {tuple(logw.shape)}")
        lwn, log_mean, ess = self.base.normalize(logw)  # validates; the heavy pass, local
        if self.world_size == 1:
            return lwn, log_mean, ess
        n_local = logw.shape[1]
        # Per rank: its logsumexp and Σ of its locally normalized squared weights (= 1 / ESS).
        lse = log_mean.double() + math.log(n_local)
        sq = torch.where(ess > 0, 1.0 / ess.double(), 0.0)
        parts = self._gather_rows(torch.stack([lse, sq], -1).unsqueeze(1))  # (B, W, 2)
        lse_r, sq_r = parts[..., 0], parts[..., 1]
        lse_all = torch.logsumexp(lse_r, -1)  # (B,)
        dead = torch.isneginf(lse_all)
        share = torch.where(dead.unsqueeze(-1), 0.0, (lse_r - lse_all.unsqueeze(-1)).exp())
        ess_all = torch.where(dead, 0.0, 1.0 / (share.square() * sq_r).sum(-1).clamp_min(
            torch.finfo(torch.float64).tiny))
        shift = torch.where(dead, 0.0, lse - lse_all).unsqueeze(-1)
        lwn_global = torch.where(dead.unsqueeze(-1), -math.inf, lwn.double() + shift)
        log_mean_all = lse_all - math.log(n_local * self.world_size)
        dt = logw.dtype
        return lwn_global.to(dt), log_mean_all.to(dt), ess_all.to(dt)

    def next_temperature(self, beta: torch.Tensor, log_target: torch.Tensor,
                         log_ref: torch.Tensor, logw: torch.Tensor | None = None,
                         **kwargs) -> torch.Tensor:
        """:func:`pathsmc.samplers.next_temperature` on the global population: rank 0
        bisects on the gathered ``log γ``, ``log ref`` and log-weights and broadcasts β', so
        every rank takes the same step (arguments as there)."""
        from pathsmc.samplers import next_temperature

        if self.world_size == 1:
            return next_temperature(beta, log_target, log_ref, logw, **kwargs)
        full = [self._gather_to_root(t) for t in (log_target, log_ref)]
        full_logw = None if logw is None else self._gather_to_root(logw)
        if self.rank == 0:
            new_beta = next_temperature(beta, *full, full_logw, **kwargs).contiguous()
        else:
            new_beta = torch.empty_like(beta)
        return self._broadcast(new_beta)

    def log_z(self, logw: torch.Tensor) -> torch.Tensor:
        """``log Ẑ = logsumexp(logw) − log N`` per row over the global population ``(B,)``."""
        return self.normalize(logw)[1]

    def resample(self, logw: torch.Tensor, scheme: str = "systematic",
                 num_samples: int | None = None, uniforms: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """:func:`pathsmc.ops.resample` over the global population: ``(B, M)`` ancestors as
        global particle indices (M = ``num_samples``, default the global N), the same on
        every rank (rank 0 draws with ``uniforms`` / ``generator`` and broadcasts)."""
        if logw.dim() != 2:
            raise ValueError(f"logw: expected (B, N_local), got shape {tuple(logw.shape)}")
        if self.world_size == 1:
            return self.base.resample(logw, scheme, num_samples, uniforms, generator)
        full = self._gather_to_root(logw)
        b, n = logw.shape[0], logw.shape[1] * self.world_size
        m = n if num_samples is None else int(num_samples)
        if self.rank == 0:
            anc = self.base.resample(full, scheme, m, uniforms, generator).contiguous()
        else:
            anc = torch.empty(b, m, dtype=torch.int64, device=logw.device)
        return self._broadcast(anc)

    def _gather_to_root(self, t: torch.Tensor) -> torch.Tensor | None:
        """``(B, N_local, ...)`` of every rank concatenated on rank 0 (None elsewhere)."""
        send = t.contiguous()
        parts = [torch.empty_like(send) for _ in range(self.world_size)] if self.rank == 0 \
            else None
        dist.gather(send, parts, dst=self._root, group=self.group)
        return torch.cat(parts, dim=1) if self.rank == 0 else None

    def adaptive_resample(
        self,
        states: Sequence[torch.Tensor],
        logw: torch.Tensor,
        threshold: float = 0.5,
        scheme: str = "systematic",
        uniforms: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`pathsmc.ops.adaptive_resample` over the global population.

        Returns ``(states (B, N_local, ...), logw (B, N_local), ancestors (B, N_local) as
        global particle indices, resampled (B,))``, the same ``resampled`` on every rank.
        ``uniforms`` and ``generator`` are used on rank 0 only (it draws for everyone).
        """
        if logw.dim() != 2:
            raise ValueError(f"logw: expected (B, N_local), got shape {tuple(logw.shape)}")
        if self.world_size == 1:
            return self.base.adaptive_resample(states, logw, threshold=threshold, scheme=scheme,
                                               uniforms=uniforms, generator=generator)
        b, n_local = logw.shape
        n = n_local * self.world_size
        # Rank 0 gathers the weights, decides and draws, and sends each rank its slice of the
        # ancestors with the row mask and the rows' log Ẑ (as int64 bits) in one message.
        full = self._gather_to_root(logw)
        mine = torch.empty(b, n_local + 2, dtype=torch.int64, device=logw.device)
        chunks = None
        if self.rank == 0:
            index = torch.arange(n, device=logw.device).expand(b, n)
            _, new_full, anc, mask = self.base.adaptive_resample(
                [index], full, threshold=threshold, scheme=scheme, uniforms=uniforms,
                generator=generator)
            log_mean = self.base.normalize(full)[1].double()
            tail = torch.stack([mask.to(torch.int64), log_mean.view(torch.int64)], -1)
            chunks = [torch.cat([self._slice(anc, r), tail], -1).contiguous()
                      for r in range(self.world_size)]
        dist.scatter(mine, chunks, src=self._root, group=self.group)
        anc_local, mask = mine[:, :n_local], mine[:, n_local].bool()
        log_mean = mine[:, n_local + 1].contiguous().view(torch.float64).to(logw.dtype)
        new_logw = torch.where(mask.unsqueeze(-1), log_mean.unsqueeze(-1), logw)
        return self._gather_states(states, anc_local), new_logw, anc_local, mask

    def _gather_states(self, states: Sequence[torch.Tensor],
                       anc_local: torch.Tensor) -> list[torch.Tensor]:
        """Each state's particles at the global indices ``anc_local``: every state viewed as
        bytes, packed side by side, all-gathered once, gathered by row and unpacked."""
        if not states:
            return []
        b, n_local = anc_local.shape
        flat = [s.contiguous().reshape(b, n_local, -1) for s in states]
        raw = [f.view(torch.uint8) for f in flat]  # bool, ints, floats: one byte layout
        full = self._gather_rows(torch.cat(raw, -1) if len(raw) > 1 else raw[0])
        # Row copies by index_select on (B·N, bytes): take_along_dim would gather byte by byte.
        rows = anc_local + torch.arange(b, device=anc_local.device).unsqueeze(-1) * full.shape[1]
        picked = full.reshape(-1, full.shape[-1]).index_select(0, rows.reshape(-1))
        picked = picked.reshape(b, n_local, -1)
        out, start = [], 0
        for s, f, r in zip(states, flat, raw, strict=True):
            part = picked[..., start:start + r.shape[-1]].contiguous()
            start += r.shape[-1]
            out.append(part.view(f.dtype).reshape(s.shape))
        return out


@dataclass
class DistributedSMCResult(SMCResult):
    """An :class:`~pathsmc.smc.SMCResult` of one rank: ``states`` and ``logw`` are this rank's
    ``N_local`` particles; ``log_z``, ``ess`` and ``resampled`` are global (the same on every
    rank); :attr:`weights` are normalized over the whole population, so the weighted sums of
    all ranks add up to the global estimate (``torch.distributed.all_reduce``).

    Attributes (besides SMCResult's):
        rank, world_size: this rank and the number of ranks.
        global_log_norm: ``logsumexp`` of the final log-weights over all ranks ``(B,)``.
    """

    rank: int = 0
    world_size: int = 1
    global_log_norm: torch.Tensor | None = None

    @property
    def weights(self) -> torch.Tensor:
        """This rank's normalized weights ``(B, N_local)`` (normalized over all ranks)."""
        return weights_from_log_norm(self.logw, self.global_log_norm)


def smc(
    model: FeynmanKacModel,
    particles: int,
    batch: int = 1,
    *,
    threshold: float = 0.5,
    scheme: str = "systematic",
    generator: torch.Generator | None = None,
    group: dist.ProcessGroup | None = None,
    progress: bool | None = None,
    desc: str = "smc",
    ops=None,
) -> DistributedSMCResult:
    """:func:`pathsmc.smc.smc` with the population split across the ranks of ``group``.

    Call it on every rank with the same arguments except ``generator`` (each rank's own:
    seed them differently). ``particles`` is N_local, the particles of each row on this rank;
    the population has ``world_size · particles`` per row. ``threshold`` compares the global
    ESS with ``threshold · N``. The progress bar is shown on rank 0 only. ``ops`` is the
    single-process ops module (default :mod:`pathsmc.ops`).
    """
    dops = DistributedOps(group, ops)
    steps = check_run_args(model, particles, batch, threshold)
    # Once, before the loop: every rank must run the same shapes and steps (a mismatch would
    # deadlock or mix up the collectives).
    shapes = [None] * dops.world_size
    dist.all_gather_object(shapes, (int(batch), int(particles), steps), group=group)
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"pathsmc.distributed.smc: every rank must use the same (batch, "
                         f"particles, num_steps); got {shapes}")
    with progress_bar(steps, progress if dops.rank == 0 else False, desc) as bar:
        states, logw, ess, res, _ = run_loop(model, particles, batch, steps, threshold,
                                          scheme, generator, dops, bar.update)
    _, log_z, _ = dops.normalize(logw.double())
    n = particles * dops.world_size
    return DistributedSMCResult(states, logw, log_z, ess, res, dead_rows(ess),
                                rank=dops.rank, world_size=dops.world_size,
                                global_log_norm=log_z + math.log(n))


def annealed_smc(target, particles: int, batch: int = 1, *,
                 group: dist.ProcessGroup | None = None, generator: torch.Generator | None = None,
                 progress: bool | None = None, **kwargs) -> AnnealedSMCResult:
    """:func:`pathsmc.samplers.annealed_smc` with the population split across the ranks of
    ``group``: ``particles`` per row on this rank, ``world_size · particles`` in all.

    The tempering step is chosen on the global population (rank 0 bisects and broadcasts β'),
    resampling is global, log Ẑ and the ESS history are global (the same on every rank); the
    MALA moves are local, and each rank adapts its step size from its own acceptance rates
    (the ``step_size`` and ``accept`` histories are this rank's). Keyword arguments are
    annealed_smc's; the waste-free variant is not distributed. Call on every rank with the
    same arguments except ``generator`` (seed each rank differently).
    """
    from pathsmc.samplers import annealed_smc as _annealed_smc

    if kwargs.get("waste_free"):
        raise ValueError("waste_free: the waste-free variant is not distributed; run "
                         "pathsmc.samplers.annealed_smc on each rank instead")
    if "ops" in kwargs:
        raise ValueError("ops: set by pathsmc.distributed.annealed_smc (a DistributedOps)")
    dops = DistributedOps(group)
    shapes = [None] * dops.world_size
    dist.all_gather_object(shapes, (int(batch), int(particles), kwargs.get("max_steps")),
                           group=group)
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"pathsmc.distributed.annealed_smc: every rank must use the same "
                         f"(batch, particles, max_steps); got {shapes}")
    res = _annealed_smc(target, particles, batch, generator=generator, ops=dops,
                        progress=progress if dops.rank == 0 else False, **kwargs)
    res.population = particles * dops.world_size
    return res


class DistributedParallelTempering(ParallelTempering):
    """:class:`pathsmc.tempering.ParallelTempering` with its chain columns split across the
    ranks of ``group``: each rank runs ``particles`` columns (all K levels of each) and the
    run has ``world_size · particles``.

    A column is an independent PT system, so scans need no communication; at each round's end
    (where the single-process sampler reads its statistics anyway) the per-column sums are
    all-gathered, the MALA acceptance and energy sums all-reduced and the step sizes averaged,
    so every rank computes the same :class:`~pathsmc.tempering.RoundStats` over all columns
    (swap acceptance, Λ̂, round trips, stepping-stone log Ẑ and their standard errors) and
    adapts to the same schedule. SEO parities come from a host stream seeded by rank 0, so all
    ranks attempt the same pairs. ``x`` and recorded ``samples`` stay per rank. Arguments are
    ParallelTempering's, plus ``group``; give each rank its own ``generator``.
    """

    def __init__(self, target, reference=None, *, group: dist.ProcessGroup | None = None,
                 **kwargs) -> None:
        self._dops = DistributedOps(group)
        super().__init__(target, reference, **kwargs)
        shared = [self._host_rng.getrandbits(64) if self._dops.rank == 0 else None]
        dist.broadcast_object_list(shared, src=self._dops._root, group=group)
        self._host_rng = random.Random(shared[0])
        shapes = [None] * self._dops.world_size
        dist.all_gather_object(shapes, (self.B, self.C, self.K, self.swap, self.local_steps),
                               group=group)
        if any(x != shapes[0] for x in shapes):
            raise ValueError("DistributedParallelTempering: every rank must use the same "
                             f"(batch, particles, num_levels, swap, local_steps); "
                             f"got {shapes}")

    def _gather_columns(self, t: torch.Tensor, lead: int) -> torch.Tensor:
        """``(*lead, B·C_local)`` per rank -> ``(*lead, B·C)`` (each problem's columns)."""
        shape = t.shape[:lead]
        per = t.reshape(-1, self.B, self.C).transpose(0, 1)  # (B, lead..., C_local)
        full = self._dops._gather_rows(per.contiguous().transpose(1, 2))  # (B, C, lead...)
        return full.transpose(1, 2).transpose(0, 1).reshape(*shape, -1)

    def _round_stats(self, acc, scans, adapted, energy, samples):
        world = self._dops.world_size
        acc = dict(acc)
        for name in ("swap_rb", "swap_acc", "ss_fwd", "ss_bwd"):
            acc[name] = self._gather_columns(acc[name], 1)
        for name in ("trips", "restarts"):
            acc[name] = self._gather_columns(acc[name].unsqueeze(0), 1)[0]
        mala = acc["mala"].clone()
        dist.all_reduce(mala, group=self._dops.group)
        acc["mala"] = mala
        energy = torch.stack(energy)
        dist.all_reduce(energy, group=self._dops.group)
        energy = list(energy / world)
        log_h = self._log_h.clone()
        dist.all_reduce(log_h, group=self._dops.group)
        self._log_h = log_h / world
        local_c = self.C
        self.C = local_c * world  # the statistics are over every rank's columns
        try:
            return super()._round_stats(acc, scans, adapted, energy, samples)
        finally:
            self.C = local_c

    def run(self, rounds: int, *, report: bool = False, plot: str | None = None,
            progress: bool | None = None, **kwargs) -> PTResult:
        """:meth:`ParallelTempering.run` (report, plot and progress bar on rank 0 only)."""
        lead = self._dops.rank == 0
        return super().run(rounds, report=report and lead, plot=plot if lead else None,
                           progress=progress if lead else False, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Deprecated (kept for one release): the worked example moved out of the library to
    ``examples/distributed_smc.py``; run ``torchrun --nproc-per-node 2
    examples/distributed_smc.py``. This shim runs that script when the repository's
    ``examples/`` folder sits next to the package (a source checkout or editable install)."""
    import runpy
    import warnings
    from pathlib import Path

    warnings.warn("`python -m pathsmc.distributed` is deprecated: the worked example moved to "
                  "examples/distributed_smc.py (torchrun --nproc-per-node 2 "
                  "examples/distributed_smc.py)", DeprecationWarning, stacklevel=2)
    script = Path(__file__).resolve().parents[2] / "examples" / "distributed_smc.py"
    if not script.is_file():
        raise SystemExit("the distributed worked example is examples/distributed_smc.py in the "
                         "pathsmc repository (not installed with the package)")
    return int(runpy.run_path(str(script), run_name="pathsmc_distributed_example")["main"](argv))


if __name__ == "__main__":
    raise SystemExit(main())
