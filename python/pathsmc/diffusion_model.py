"""A pretrained diffusion model as pathsmc sees it: a user callable with its noise schedule.

:class:`DiffusionModel` wraps a function returning the score ∇log p_t, the noise prediction ε
or the denoised mean x̂_0 (:func:`convert_prediction` converts between them) and gives
Tweedie's denoised mean :meth:`DiffusionModel.denoise`. The contract a user's function meets
(shapes, what ``t`` is, what to return) is in the class docstring and the README ("Steer your
own network"). The drivers that use it are :func:`pathsmc.diffusion.steer` and
:mod:`pathsmc.crepe`; the schedules are in :mod:`pathsmc.schedules`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pathsmc.schedules import Schedule

__all__ = ["PREDICTIONS", "DiffusionModel", "convert_prediction"]

PREDICTIONS = ("score", "eps", "x0")


def convert_prediction(
    pred: torch.Tensor, x: torch.Tensor, t: float, schedule: Schedule, source: str, target: str
) -> torch.Tensor:
    """Convert a model output at ``(x, t)`` between the ``score``, ``eps`` and ``x0``
    parameterizations.

    With ``X_t = m X_0 + √v ε`` (``(m, v) = schedule.marginal(t)``):
    ``score = −ε / √v = (m x0 − x) / v`` and ``x0 = (x + v score) / m = (x − √v ε) / m``
    (Tweedie's formula for the denoised mean). Conversions that divide by ``v`` are undefined
    at ``v = 0`` (t = 0) and raise; the conversions to ``x0`` are defined there (x0 = x).
    """
    for name, val in (("source", source), ("target", target)):
        if val not in PREDICTIONS:
            raise ValueError(f"{name}: expected one of {PREDICTIONS}, got {val!r}")
    if source == target:
        return pred
    m, v = (float(a) for a in schedule.marginal(float(t)))
    if target == "x0":
        if source == "score":
            return (x + v * pred) / m
        return (x - math.sqrt(v) * pred) / m
    if source == "score":  # target eps
        return -math.sqrt(v) * pred
    if v <= 0.0:
        raise ValueError(f"convert_prediction: {source} -> {target} divides by the noise "
                         f"variance, which is 0 at t = {t}")
    if source == "eps":  # target score
        return pred * (-1.0 / math.sqrt(v))
    if target == "score":  # source x0
        return (m * pred - x) / v
    return (x - m * pred) / math.sqrt(v)  # x0 -> eps


class DiffusionModel:
    """A pretrained diffusion model given as a callable, with its schedule.

    Args:
        fn: ``fn(x, t)`` — or ``fn(x, t, condition)`` when ``condition`` is given — returning
            the model's prediction at the states ``x`` (``(B, N, D)``: N particles for each of
            B problems) and diffusion time ``t`` (a Python float), shaped like ``x``.
        schedule: the noise schedule the model was trained with (:class:`VPSchedule` or
            :class:`VESchedule`).
        prediction: what ``fn`` returns: ``"score"`` (∇log p_t), ``"eps"`` (the noise ε) or
            ``"x0"`` (the denoised mean E[X_0 | X_t = x]).
        condition: an optional extra argument for ``fn`` (a class label, a prompt embedding,
            ...); for B problems with their own conditions make it ``(B, ...)`` and broadcast
            inside ``fn``.
        log_prob: optional ``log_prob(x, t)`` (or ``log_prob(x, t, condition)``) returning the
            exact ``log p_t(x)`` ``(B, N)`` of the model's marginal — known for test targets;
            :func:`steer` uses it for the initial weight and for ``weighting="density"``.
        dim: the event size D (lets :func:`steer` infer it).
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        schedule: Schedule,
        prediction: str = "score",
        *,
        condition: Any = None,
        log_prob: Callable[..., torch.Tensor] | None = None,
        dim: int | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        self.fn = fn
        self.schedule = schedule
        self.prediction = prediction
        self.condition = condition
        self._log_prob = log_prob
        self.dim = dim

    def __repr__(self) -> str:
        return (f"DiffusionModel(prediction={self.prediction!r}, schedule={self.schedule!r}, "
                f"conditional={self.condition is not None}, "
                f"log_prob={self._log_prob is not None})")

    def with_condition(self, condition: Any) -> DiffusionModel:
        """The same model with another condition (e.g. the null condition of CFG)."""
        return DiffusionModel(self.fn, self.schedule, self.prediction, condition=condition,
                              log_prob=self._log_prob, dim=self.dim)

    def _call(self, f: Callable[..., torch.Tensor], x: torch.Tensor, t: float) -> torch.Tensor:
        if self.condition is None:
            return f(x, float(t))
        return f(x, float(t), self.condition)

    def predict(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """The raw output of ``fn`` at ``(x, t)``."""
        return self._call(self.fn, x, t)

    def score(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """∇_x log p_t(x)."""
        return convert_prediction(self.predict(x, t), x, t, self.schedule, self.prediction,
                                  "score")

    def eps(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """The ε-prediction ``−√v(t) · score``."""
        return convert_prediction(self.predict(x, t), x, t, self.schedule, self.prediction,
                                  "eps")

    def denoise(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Tweedie's denoised mean ``E[X_0 | X_t = x] = (x + v score) / m`` (x at t = 0)."""
        return convert_prediction(self.predict(x, t), x, t, self.schedule, self.prediction,
                                  "x0")

    def score_and_denoised(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(score, denoised mean)`` from one call of ``fn``."""
        pred = self.predict(x, t)
        return (convert_prediction(pred, x, t, self.schedule, self.prediction, "score"),
                convert_prediction(pred, x, t, self.schedule, self.prediction, "x0"))

    @property
    def has_log_prob(self) -> bool:
        """Whether the exact marginal log-density was given."""
        return self._log_prob is not None

    def log_prob(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """The exact ``log p_t(x)`` ``(B, N)`` (only when given at construction)."""
        if self._log_prob is None:
            raise ValueError("log_prob: this DiffusionModel was built without log_prob")
        return self._call(self._log_prob, x, t)

    @classmethod
    def from_mixture(cls, mixture: Any, schedule: Schedule,
                     prediction: str = "score") -> DiffusionModel:
        """The exact model of a :class:`~pathsmc.targets.GaussianMixture` data distribution:
        ``fn`` returns its diffused score (or ε / x0 prediction) and ``log_prob`` its
        diffused log-density, both exact at every t (outputs are float64)."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
        cache: dict[float, Any] = {}

        def diffused(t: float):
            dg = cache.get(t)
            if dg is None:
                dg = mixture.diffused(schedule, t)
                # Never store (or evict) while a CUDA graph is being recorded: its entries
                # would hold memory that recording never writes. A captured run's warm-up
                # fills the cache first (CapturedSMC), and the cache is not bounded: a graph
                # may read any entry at every replay.
                if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
                    cache[t] = dg
            return dg

        def fn(x: torch.Tensor, t: float) -> torch.Tensor:
            dg = diffused(t)
            if prediction == "x0":
                return dg.posterior_mean(x)
            s = dg.score(x)
            return s if prediction == "score" else convert_prediction(
                s, x.double(), t, schedule, "score", prediction)

        def log_prob(x: torch.Tensor, t: float) -> torch.Tensor:
            return diffused(t).log_prob(x)

        return cls(fn, schedule, prediction, log_prob=log_prob, dim=mixture.dim)
