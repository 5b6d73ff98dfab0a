"""``pathsmc sample``: steer a user's own diffusion model as configured in a TOML or JSON file.

The job is one call of :func:`pathsmc.diffusion.steer` per chunk of rows. The config names the
model by its Python import path, the schedule it was trained with, the steering mode and its
parameters, and the sizes; the results go to an output folder::

    pathsmc sample --config examples/steer_reward.toml --out out/steer_reward

Config reference (TOML shown; JSON takes the same structure; every key but ``particles``,
``dim``, ``model.path`` and ``steer.mode`` has a default)::

    particles = 1024          # N particles per row
    batch = 16                # B independent rows (prompts / conditions / repeats)
    chunk = 4                 # rows per steer() call (default: all); chunks resume
    steps = 100               # Euler–Maruyama steps from t = 1 to t_end
    t_end = 0.0
    dim = 2                   # event size D (flattened)
    device = "cpu"            # "cuda", "cuda:1", ...
    dtype = "float32"         # particle dtype ("float64"); log-weights are float64
    seed = 0                  # chunk i is seeded with chunk_seed(seed, i)
    threshold = 0.5           # resample a row when its ESS < threshold · N (default: 0.5,
                              # 1.0 for sharpening targets, Σβ > 1: steer's default)
    scheme = "systematic"     # stratified, multinomial, residual
    format = "pt"             # "npz": result.npz as well
    threads = 0               # torch intra-op threads (0: torch's default)
    out = "out/job"           # output folder (--out overrides)
    pythonpath = ["src"]      # extra import dirs, relative to the config file
    exact_log_z = 2.9688      # optional known answer: the report adds z = (log Ẑ − it)/SE

    [model]                   # or [[model]] tables, one per model, for mode "product"
    path = "my_models:score"  # module:attribute; the model fn(x, t[, condition])
    prediction = "score"      # what fn returns: "score", "eps" or "x0"
    args = { ckpt = "m.pt" }  # optional: path is a factory, called once with these kwargs
    condition = [0, 1, 0, 1]  # optional third argument of fn: one entry per row (first
                              # dimension = batch, split with the chunks), or a scalar
                              # shared by every row
    log_prob = "my_models:log_prob"   # optional exact log p_t(x) (for weighting = "density")
    kind = "function"         # or "diffusers": path names a DiffusersModel, or with args a
                              # factory returning one (pathsmc.integrations.diffusers); then
                              # condition = per-row class labels, steps = the scheduler's
                              # inference steps, and prediction, log_prob, dim, t_end and
                              # [schedule] are not used (the scheduler's chain fixes them)

    [schedule]
    kind = "vp"               # vp: beta_min = 0.1, beta_max = 20.0
                              # ve: sigma_min = 0.01, sigma_max = 10.0

    [steer]
    mode = "reward"           # reward | temper | product | twisted | uncorrected
    reward = "my_rewards:aesthetic"   # reward(x) -> (B, N) log-potential
    reward_args = { scale = 2.0 }     # optional: reward is then a factory, called once with
                                      # these ({} for a factory without arguments)
    potential = "difference"  # difference | max | sum  (mode reward)
    potential_every = 1
    guidance = 0.0            # gradient guidance scale (twisted: 1)
    value = "my_values:v"     # twisted: value(x, t) -> V or (V, ∇V); value_args likewise
    beta = 0.5                # temper: β; product: [β1, β2, ...]
    weighting = "path"        # or "density" (every model needs log_prob)

One rule for every import path (``model.path``, ``log_prob``, ``steer.reward``,
``steer.value``): without its ``*_args`` table it names the function itself; with one it names
a factory, called once with those keyword arguments (``{}`` for none), that returns the
function. Before the first step every function is called once and checked (a torch tensor on
the job's device, floating point, finite, shaped like ``x`` — ``(B, N, dim)`` — for the model,
``(B, N)`` for rewards, values and log-densities); an error names the config key.

Keys starting with ``_`` are ignored (comments in JSON). Import paths are resolved with the
config file's folder, the ``pythonpath`` entries and the current directory in front of
``sys.path``. Model functions get ``x`` ``(B, N, D)`` for the rows of the current chunk; a
reward or value function that depends on the row should take its per-row data from the model's
``condition`` (or set ``chunk = batch``).

The output folder holds ``result.pt`` (a dict of CPU tensors: ``particles`` (B, N, D),
``logw`` (B, N), ``log_z`` (B,), ``ess`` and ``resampled`` (steps, B), ``final_ess`` and
``num_resampled`` (B,), ``dead_rows`` {row: step}, ``dead_particles`` (B,) (particles killed by
non-finite output), plus ``config``, ``seeds``, ``chunks``,
versions and timing), ``result.npz`` with the same arrays when ``format = "npz"``,
``report.txt`` (also printed) and ``job.json`` (the parsed config and its fingerprint). With
``chunk < batch`` every chunk is written to ``chunks/chunk-NNNN.pt`` as soon as it is done and
skipped when the job is started again, so an interrupted job resumes where it stopped; a folder
whose chunks belong to another config, or that already holds results, is never overwritten
without ``--force`` (which starts afresh).

Several GPUs or processes: ``torchrun --nproc-per-node G -m pathsmc.cli sample --config ...``
deals the chunks out round-robin (chunk i to rank i mod G; ``device = "cuda"`` becomes each
rank's ``cuda:LOCAL_RANK``); every rank writes its chunk files and rank 0 combines them and
writes the results and the report. The chunks are seeded by their index, so the result is the
same as a one-process run of the same config on the same kind of device; set ``chunk`` so that
there are at least G chunks.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import json
import math
import os
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pathsmc._validate import RESAMPLING_SCHEMES as SCHEMES
from pathsmc.diagnostics import collapse_messages
from pathsmc.diffusion import (
    MODES,
    DiffusionModel,
    VESchedule,
    VPSchedule,
    check_steering,
    default_threshold,
    steer,
)

__all__ = [
    "ConfigError",
    "JobConfig",
    "ResultsExistError",
    "chunk_seed",
    "load_config",
    "resolve",
    "run_sample",
]

PREDICTIONS = ("score", "eps", "x0")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
FORMATS = ("pt", "npz")
RESULT_FILES = ("result.pt", "result.npz", "report.txt")

_TOP_KEYS = ("particles", "batch", "chunk", "steps", "t_end", "dim", "device", "dtype", "seed",
             "threshold", "scheme", "format", "threads", "out", "pythonpath", "exact_log_z",
             "model", "schedule", "steer")
_MODEL_KEYS = ("path", "kind", "prediction", "args", "condition", "log_prob", "log_prob_args")
MODEL_KINDS = ("function", "diffusers")
_SCHEDULE_KEYS = {"vp": ("kind", "beta_min", "beta_max"),
                  "ve": ("kind", "sigma_min", "sigma_max")}
_STEER_KEYS = ("mode", "reward", "reward_args", "value", "value_args", "beta", "potential",
               "potential_every", "guidance", "weighting")
# keys that do not change the samples (left out of the fingerprint that guards resumed chunks)
_NOT_IN_FINGERPRINT = ("out", "format", "exact_log_z", "threads")


class ConfigError(ValueError):
    """A bad config: the message names the key (``steer.reward``, ``model[1].path``, ...)."""


class ResultsExistError(RuntimeError):
    """The output folder already holds results (or chunks of another job) and ``--force``
    was not given."""


# ---------------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """One ``[model]`` table."""

    key: str
    """Where it sits in the config (``model`` or ``model[i]``), for error messages."""
    path: str
    kind: str = "function"
    """``"function"``: ``fn(x, t[, condition])`` on a [schedule]; ``"diffusers"``: a
    :class:`pathsmc.integrations.diffusers.DiffusersModel` (its scheduler is the chain)."""
    prediction: str = "score"
    args: dict[str, Any] | None = None
    condition: Any = None
    log_prob: str | None = None
    log_prob_args: dict[str, Any] | None = None


@dataclass
class JobConfig:
    """A parsed and checked config (see the module docstring for the keys)."""

    source: Path
    raw: dict[str, Any]
    models: list[ModelSpec]
    schedule: dict[str, Any]
    steer: dict[str, Any]
    particles: int
    dim: int | None
    batch: int = 1
    chunk: int = 1
    steps: int = 100
    t_end: float = 0.0
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    threshold: float = 0.5
    scheme: str = "systematic"
    format: str = "pt"
    threads: int = 0
    out: str | None = None
    pythonpath: list[str] = field(default_factory=list)
    exact_log_z: float | None = None

    @property
    def mode(self) -> str:
        """The steering mode."""
        return self.steer["mode"]

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """Row ranges ``[(start, stop), ...]`` of the chunks."""
        return [(a, min(a + self.chunk, self.batch)) for a in range(0, self.batch, self.chunk)]

    def fingerprint(self) -> str:
        """A hash of everything that determines the samples (guards resumed chunks)."""
        keep = {k: v for k, v in self.raw.items()
                if k not in _NOT_IN_FINGERPRINT and not k.startswith("_")}
        blob = json.dumps(keep, sort_keys=True, default=repr).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def import_dirs(self) -> list[Path]:
        """Folders put in front of ``sys.path`` while the job runs."""
        base = self.source.parent
        return [base] + [(base / p).resolve() for p in self.pythonpath] + [Path.cwd()]


def _unknown(table: dict[str, Any], allowed: Sequence[str], prefix: str) -> None:
    for key in table:
        if key not in allowed and not key.startswith("_"):
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            raise ConfigError(f"{prefix}{key}: unknown key{hint}; allowed here: "
                              f"{', '.join(allowed)}")


def _int(table: dict[str, Any], key: str, prefix: str, default: int | None = None, *,
         minimum: int | None = 1) -> int:
    if key not in table:
        if default is None:
            raise ConfigError(f"{prefix}{key}: missing (an integer is required)")
        return default
    v = table[key]
    if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
        need = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ConfigError(f"{prefix}{key}: expected {need}, got {v!r}")
    return v


def _float(table: dict[str, Any], key: str, prefix: str, default: float | None, *,
           lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> float | None:
    if key not in table:
        return default
    v = table[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ConfigError(f"{prefix}{key}: expected a finite number, got {v!r}")
    v = float(v)
    bad = ((lo is not None and (v <= lo if lo_open else v < lo))
           or (hi is not None and (v >= hi if hi_open else v > hi)))
    if bad:
        lo_s = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
        hi_s = "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
        raise ConfigError(f"{prefix}{key}: expected {lo_s}{key}{hi_s}, got {v!r}")
    return v


def _choice(table: dict[str, Any], key: str, prefix: str, choices: Sequence[str],
            default: str | None) -> str:
    if key not in table:
        if default is None:
            raise ConfigError(f"{prefix}{key}: missing (one of {', '.join(choices)})")
        return default
    v = table[key]
    if v not in choices:
        raise ConfigError(f"{prefix}{key}: expected one of {', '.join(choices)}, got {v!r}")
    return v


def _import_path(table: dict[str, Any], key: str, prefix: str, required: bool = False
                 ) -> str | None:
    if key not in table:
        if required:
            raise ConfigError(f"{prefix}{key}: missing (an import path 'module:attribute')")
        return None
    v = table[key]
    if not isinstance(v, str) or v.count(":") != 1 or not all(v.split(":")):
        raise ConfigError(f"{prefix}{key}: expected an import path 'module:attribute' "
                          f"(e.g. 'my_models:score'), got {v!r}")
    return v


def _table(table: dict[str, Any], key: str, prefix: str) -> dict[str, Any] | None:
    if key not in table:
        return None
    v = table[key]
    if not isinstance(v, dict):
        raise ConfigError(f"{prefix}{key}: expected a table of keyword arguments, got {v!r}")
    return v


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    text = path.read_bytes()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        elif path.suffix.lower() == ".toml":
            data = tomllib.loads(text.decode())
        else:
            raise ConfigError(f"--config: expected a .toml or .json file, got {path.name}")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config: cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config: expected a table at the top of {path}")
    return data


def load_config(path: str | Path) -> JobConfig:
    """Read and check a TOML or JSON job config; raises :class:`ConfigError` naming the key.

    Only the config is checked here; the import paths are resolved by :func:`run_sample`
    (:func:`resolve`).
    """
    path = Path(path)
    raw = _read(path)
    _unknown(raw, _TOP_KEYS, "")
    # [model] or [[model]]
    if "model" not in raw:
        raise ConfigError("model: missing (a [model] table with path = 'module:attribute')")
    tables = raw["model"]
    if isinstance(tables, dict):
        tables, keys = [tables], ["model"]
    elif isinstance(tables, list) and tables and all(isinstance(t, dict) for t in tables):
        keys = [f"model[{i}]" for i in range(len(tables))] if len(tables) > 1 else ["model"]
    else:
        raise ConfigError("model: expected a [model] table or [[model]] tables")
    models = []
    for key, t in zip(keys, tables, strict=True):
        pre = f"{key}."
        _unknown(t, _MODEL_KEYS, pre)
        kind = _choice(t, "kind", pre, MODEL_KINDS, "function")
        if kind == "diffusers":
            for k in ("prediction", "log_prob", "log_prob_args"):
                if k in t:
                    raise ConfigError(f"{pre}{k}: not used with kind = 'diffusers' (the "
                                      "scheduler's config says what the network predicts, "
                                      "and the chain has no exact log-density)")
        models.append(ModelSpec(
            key=key, path=_import_path(t, "path", pre, required=True), kind=kind,
            prediction=_choice(t, "prediction", pre, PREDICTIONS, "score"),
            args=_table(t, "args", pre), condition=t.get("condition"),
            log_prob=_import_path(t, "log_prob", pre),
            log_prob_args=_table(t, "log_prob_args", pre)))
    diffusers = [m.kind == "diffusers" for m in models]
    if any(diffusers) and not all(diffusers):
        raise ConfigError("model: kind = 'diffusers' and function models cannot be mixed")
    if all(diffusers):
        # the scheduler's chain fixes the time grid and the state shape
        for k in ("schedule", "dim", "t_end"):
            if k in raw:
                raise ConfigError(f"{k}: not used with kind = 'diffusers' models (the "
                                  "scheduler's chain fixes the time grid and the UNet's "
                                  "sample shape the state)")
    # [schedule]
    sched = raw.get("schedule", {"kind": "vp"})
    if not isinstance(sched, dict):
        raise ConfigError(f"schedule: expected a table, got {sched!r}")
    kind = _choice(sched, "kind", "schedule.", tuple(_SCHEDULE_KEYS), "vp")
    _unknown(sched, _SCHEDULE_KEYS[kind], "schedule.")
    schedule: dict[str, Any] = {"kind": kind}
    for k in _SCHEDULE_KEYS[kind][1:]:
        v = _float(sched, k, "schedule.", None, lo=0.0, lo_open=True)
        if v is not None:
            schedule[k] = v
    # [steer]
    st = raw.get("steer")
    if not isinstance(st, dict):
        raise ConfigError("steer: missing (a [steer] table with mode = one of "
                          f"{', '.join(MODES)})")
    _unknown(st, _STEER_KEYS, "steer.")
    steer: dict[str, Any] = {"mode": _choice(st, "mode", "steer.", MODES, None)}
    mode = steer["mode"]
    for k in ("reward", "value"):
        steer[k] = _import_path(st, k, "steer.")
        steer[f"{k}_args"] = _table(st, f"{k}_args", "steer.")
        if steer[f"{k}_args"] is not None and steer[k] is None:
            raise ConfigError(f"steer.{k}_args: given without steer.{k}")
    if "potential" in st and mode != "reward":
        raise ConfigError(f"steer.potential: only mode 'reward' takes FK potentials, "
                          f"not {mode!r}")
    steer["potential"] = _choice(st, "potential", "steer.", ("difference", "max", "sum"),
                                 "difference")
    steer["potential_every"] = _int(st, "potential_every", "steer.", 1)
    steer["guidance"] = _float(st, "guidance", "steer.", None)
    steer["weighting"] = _choice(st, "weighting", "steer.", ("path", "density"), "path")
    if mode == "product" and len(models) < 2:  # one model is mode "temper": likely a mistake
        raise ConfigError("model: mode 'product' needs two or more models ([[model]] tables)")
    beta = st.get("beta")
    keys = {"model": "model", "mode": "steer.mode"}
    betas, _ = check_steering(
        mode, [m.log_prob is not None for m in models], reward=steer["reward"] is not None,
        value=steer["value"] is not None, beta=beta, guidance=steer["guidance"],
        weighting=steer["weighting"], error=ConfigError,
        name=lambda k: (f"{models[int(k[9:-1])].key}.log_prob" if k.startswith("log_prob")
                        else keys.get(k, f"steer.{k}")))
    steer["beta"] = betas[0] if mode == "temper" else (betas if beta is not None else None)
    # sizes and the rest
    batch = _int(raw, "batch", "", 1)
    for m in models:
        _check_condition_rows(m, batch)
    chunk = _int(raw, "chunk", "", batch)
    dtype = _choice(raw, "dtype", "", tuple(DTYPES), "float32")
    device = raw.get("device", "cpu")
    if not isinstance(device, str):
        raise ConfigError(f"device: expected a string such as 'cpu' or 'cuda', got {device!r}")
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device: {exc}") from exc
    pythonpath = raw.get("pythonpath", [])
    if not isinstance(pythonpath, list) or not all(isinstance(p, str) for p in pythonpath):
        raise ConfigError(f"pythonpath: expected a list of folders, got {pythonpath!r}")
    out = raw.get("out")
    if out is not None and not isinstance(out, str):
        raise ConfigError(f"out: expected a folder name, got {out!r}")
    return JobConfig(
        source=path.resolve(), raw=raw, models=models, schedule=schedule, steer=steer,
        particles=_int(raw, "particles", ""),
        dim=None if all(diffusers) else _int(raw, "dim", ""), batch=batch,
        chunk=min(chunk, batch), steps=_int(raw, "steps", "", 100),
        t_end=_float(raw, "t_end", "", 0.0, lo=0.0, hi=1.0, hi_open=True),
        device=device, dtype=dtype, seed=_int(raw, "seed", "", 0, minimum=0),
        threshold=_float(raw, "threshold", "", default_threshold(betas), lo=0.0),
        scheme=_choice(raw, "scheme", "", SCHEMES, "systematic"),
        format=_choice(raw, "format", "", FORMATS, "pt"),
        threads=_int(raw, "threads", "", 0, minimum=0), out=out, pythonpath=pythonpath,
        exact_log_z=_float(raw, "exact_log_z", "", None))


def _check_condition_rows(m: ModelSpec, batch: int) -> None:
    """A condition is a scalar (shared by every row) or has one entry per row."""
    if m.condition is None:
        return
    try:
        shape = tuple(torch.as_tensor(m.condition).shape)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{m.key}.condition: cannot make a tensor of {m.condition!r}: "
                          f"{exc}") from exc
    if shape and shape[0] != batch:
        raise ConfigError(f"{m.key}.condition: expected one entry per row (first dimension "
                          f"batch = {batch}) or a scalar shared by every row, got shape "
                          f"{shape}")


# ---------------------------------------------------------------------------------------------
# Import paths
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _import_dirs(dirs: Sequence[Path]) -> Iterator[None]:
    added = [str(d) for d in dirs if str(d) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for d in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(d)


def resolve(spec: str, key: str, args: dict[str, Any] | None = None, *,
            diffusers: bool = False) -> Any:
    """The callable at the import path ``module:attribute`` (``attribute`` may be dotted);
    with ``args``, the result of calling it with them (a factory). Errors name ``key``.
    With ``diffusers``, the object (or the factory's result) must be a
    :class:`~pathsmc.integrations.diffusers.DiffusersModel`."""
    module_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({exc}); modules are "
                          "looked up next to the config file, in its 'pythonpath' folders, "
                          "in the current directory and on sys.path") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if diffusers:
        return _diffusers_model(obj, spec, key, args)
    if isinstance(obj, DiffusionModel):
        raise ConfigError(f"{key}: {spec} is a DiffusionModel; give the import path of its "
                          "function (the fn(x, t[, condition]) it wraps) and set "
                          f"prediction and [schedule] in the config")
    if not callable(obj):
        raise ConfigError(f"{key}: {spec} is a {type(obj).__name__}, not a callable")
    if args is not None:
        try:
            obj = obj(**args)
        except Exception as exc:
            raise ConfigError(f"{key}_args: calling {spec}(**{args!r}) failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        if not callable(obj):
            raise ConfigError(f"{key}_args: {spec}(**{args!r}) returned a "
                              f"{type(obj).__name__}, not a callable")
    return obj


def _diffusers_model(obj: Any, spec: str, key: str, args: dict[str, Any] | None) -> Any:
    """A DiffusersModel named by ``spec`` (itself, or made by a factory called with args)."""
    from pathsmc.integrations.diffusers import DiffusersModel

    if args is not None:
        if not callable(obj):
            raise ConfigError(f"{key}_args: {spec} is a {type(obj).__name__}, not a factory")
        try:
            obj = obj(**args)
        except Exception as exc:
            raise ConfigError(f"{key}_args: calling {spec}(**{args!r}) failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, DiffusersModel):
        how = "returned" if args is not None else "is"
        raise ConfigError(f"{key}: kind = 'diffusers' needs a DiffusersModel, but {spec} {how} "
                          f"a {type(obj).__name__} (a factory needs {key.rsplit('.', 1)[0]}"
                          ".args, {} for none)")
    return obj


def _schedule(cfg: JobConfig):
    params = {k: v for k, v in cfg.schedule.items() if k != "kind"}
    cls = VPSchedule if cfg.schedule["kind"] == "vp" else VESchedule
    try:
        return cls(**params)
    except ValueError as exc:
        raise ConfigError(f"schedule: {exc}") from exc


def _condition(value: Any, key: str, device: torch.device) -> Any:
    if value is None:
        return None
    try:
        return torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{key}.condition: cannot make a tensor of {value!r}: {exc}") from exc


def _rows(cond: Any, start: int, stop: int, batch: int) -> Any:
    """The chunk's rows of a per-row condition ``(B, ...)``; anything else unchanged."""
    if isinstance(cond, torch.Tensor) and cond.dim() >= 1 and cond.shape[0] == batch:
        return cond[start:stop]
    return cond


@dataclass
class _Job:
    """The resolved callables of a config."""

    fns: list[Callable[..., torch.Tensor]]
    log_probs: list[Callable[..., torch.Tensor] | None]
    conditions: list[Any]
    reward: Callable[..., torch.Tensor] | None
    value: Callable[..., Any] | None
    schedule: Any


def _resolve_job(cfg: JobConfig) -> _Job:
    device = torch.device(cfg.device)
    fns, log_probs, conds = [], [], []
    for m in cfg.models:
        fns.append(resolve(m.path, f"{m.key}.path", m.args, diffusers=m.kind == "diffusers"))
        log_probs.append(None if m.log_prob is None
                         else resolve(m.log_prob, f"{m.key}.log_prob", m.log_prob_args))
        conds.append(_condition(m.condition, m.key, device))
    st = cfg.steer
    reward = None if st["reward"] is None else resolve(st["reward"], "steer.reward",
                                                       st["reward_args"])
    value = None if st["value"] is None else resolve(st["value"], "steer.value",
                                                     st["value_args"])
    return _Job(fns, log_probs, conds, reward, value, _schedule(cfg))


def chunk_seed(seed: int, index: int) -> int:
    """The seed of chunk ``index``: independent streams for the chunks of one job, the same
    whether or not the job was interrupted."""
    import numpy as np

    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _run_chunk(cfg: JobConfig, job: _Job, index: int, start: int, stop: int,
               progress: bool) -> dict[str, Any]:
    models = []
    for m, fn, lp, cond in zip(cfg.models, job.fns, job.log_probs, job.conditions,
                               strict=True):
        if m.kind == "diffusers":  # the condition is the rows' class labels
            rows = _rows(cond, start, stop, cfg.batch)
            if isinstance(rows, torch.Tensor) and rows.dim() == 0:
                rows = rows.expand(stop - start)
            models.append(fn if rows is None else fn.with_condition(class_labels=rows))
            continue
        models.append(DiffusionModel(fn, job.schedule, m.prediction,
                                     condition=_rows(cond, start, stop, cfg.batch),
                                     log_prob=lp, dim=cfg.dim))
    st = cfg.steer
    kwargs: dict[str, Any] = {"weighting": st["weighting"]}
    if st["mode"] == "reward":
        kwargs.update(potential=st["potential"], potential_every=st["potential_every"])
    elif st["mode"] == "twisted":
        kwargs.update(potential_every=st["potential_every"])
    for k in ("reward", "value"):
        if getattr(job, k) is not None:
            kwargs[k] = getattr(job, k)
    if st["beta"] is not None:
        kwargs["beta"] = st["beta"]
    if st["guidance"] is not None:
        kwargs["guidance"] = st["guidance"]
    seed = chunk_seed(cfg.seed, index)
    t0 = time.perf_counter()
    try:
        res = steer(models if st["mode"] in ("product", "uncorrected") else models[0],
                    st["mode"], particles=cfg.particles, batch=stop - start, steps=cfg.steps,
                    dim=cfg.dim, t_end=cfg.t_end, threshold=cfg.threshold, scheme=cfg.scheme,
                    seed=seed, device=_rank_device(cfg.device), dtype=DTYPES[cfg.dtype],
                    progress=progress, replicates=False, **kwargs)  # the report checks all rows
    except (TypeError, ValueError, RuntimeError) as exc:
        key = _user_function_key(cfg, str(exc))
        if key is None:
            raise
        raise ConfigError(f"{key}: {exc} (config: dim = {cfg.dim}, batch rows "
                          f"{start}–{stop - 1})") from exc
    return {
        "rows": (start, stop), "seed": seed, "seconds": time.perf_counter() - t0,
        "particles": res.particles.detach().cpu(), "logw": res.logw.detach().double().cpu(),
        "log_z": res.log_z.detach().double().cpu(), "ess": res.ess.detach().double().cpu(),
        "resampled": res.resampled.detach().cpu(),
        "dead_rows": {start + r: s for r, s in res.dead_rows.items()},
        "dead_particles": res.dead_particles,
    }


def replicate_rows(cfg: JobConfig) -> bool:
    """Whether the job's rows are replicates of one problem: no model has a per-row
    ``condition`` (rewards and values see no row index in a config). The report then warns
    when log Ẑ spreads across the rows by more than
    :data:`pathsmc.diagnostics.SPREAD_LIMIT` nats."""
    for m in cfg.models:
        if m.condition is not None and torch.as_tensor(m.condition).dim() >= 1:
            return False
    return True


def _user_function_key(cfg: JobConfig, msg: str) -> str | None:
    """The config key of the user function an up-front check of :func:`steer` names
    (``model `m:f` returned shape ...``), else None. An exception raised inside the user's
    function is left as it is: the CLI reports it with the function's file and line."""
    if "failed on its first call" in msg:
        return None
    head = msg.split(" `", 1)[0]
    if head in ("reward", "value"):
        return f"steer.{head}"
    for i, m in enumerate(cfg.models):
        what = f"model[{i}]" if len(cfg.models) > 1 else "model"
        if head == what:
            return f"{m.key}.path"
        if head == f"{what}.log_prob":
            return f"{m.key}.log_prob"
    return None


# ---------------------------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """(rank, number of processes) of a torchrun launch; (0, 1) for one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_device(device: str) -> str:
    """``"cuda"`` is this rank's GPU (``cuda:LOCAL_RANK``) when several processes share a
    machine; any other device string is used as given."""
    if device == "cuda" and _world()[1] > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """Join the torchrun launch (WORLD_SIZE > 1) with a gloo group for the barriers and counts
    (the chunks themselves need no communication); nothing for one process."""
    import torch.distributed as dist

    start = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if start:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        if start:
            dist.destroy_process_group()


def _barrier() -> None:
    import torch.distributed as dist

    if _world()[1] > 1:
        dist.barrier()


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _prepare_folder(out: Path, cfg: JobConfig, force: bool) -> None:
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    chunk_dir = out / "chunks"
    if existing and not force:
        raise ResultsExistError(f"{out} already holds results ({', '.join(existing)}); pass "
                                "--force to overwrite them (or choose another --out)")
    job_file = out / "job.json"
    if not force and job_file.exists() and chunk_dir.is_dir() and any(chunk_dir.iterdir()):
        try:
            old = json.loads(job_file.read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError):
            old = None
        if old != cfg.fingerprint():
            raise ResultsExistError(f"{out} holds chunks of a different job (the config "
                                    "changed since they were written); pass --force to "
                                    "start afresh (or choose another --out)")
    if force:
        for name in RESULT_FILES + ("job.json",):
            (out / name).unlink(missing_ok=True)
        if chunk_dir.is_dir():
            for f in chunk_dir.glob("chunk-*.pt*"):
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    job = {"config": cfg.raw, "config_file": str(cfg.source), "fingerprint": cfg.fingerprint(),
           "chunks": cfg.chunks}
    job_file.write_text(json.dumps(job, indent=2, default=repr) + "\n")


def _load_chunk(path: Path, cfg: JobConfig, rows: tuple[int, int]) -> dict[str, Any] | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file: redo the chunk
        return None
    if (not isinstance(data, dict) or data.get("fingerprint") != cfg.fingerprint()
            or tuple(data.get("rows", ())) != rows):
        return None
    return data


def _combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    dead: dict[int, int] = {}
    for p in parts:
        dead.update(p["dead_rows"])
    return {
        "particles": torch.cat([p["particles"] for p in parts]),
        "logw": torch.cat([p["logw"] for p in parts]),
        "log_z": torch.cat([p["log_z"] for p in parts]),
        "ess": torch.cat([p["ess"] for p in parts], dim=1),
        "resampled": torch.cat([p["resampled"] for p in parts], dim=1),
        "dead_rows": dead,
        "dead_particles": torch.cat([  # chunks saved before the count existed: zeros
            p.get("dead_particles", torch.zeros(p["log_z"].shape[0], dtype=torch.int64))
            for p in parts]),
    }


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _report(cfg: JobConfig, result: dict[str, Any], *, resumed: int, seconds: float,
            files: Sequence[str]) -> str:
    st = cfg.steer
    n, b = cfg.particles, cfg.batch
    sched = ", ".join(f"{k}={v}" for k, v in cfg.schedule.items() if k != "kind")
    models = "; ".join(f"{m.path} ({m.prediction if m.kind == 'function' else 'diffusers'})"
                       for m in cfg.models)
    detail = []
    if st["mode"] == "reward":
        detail.append(f"potential {st['potential']}")
        if st["potential_every"] > 1:
            detail.append(f"every {st['potential_every']} steps")
    for k in ("reward", "value"):
        if st[k]:
            detail.append(f"{k} {st[k]}")
    if st["beta"] is not None:
        detail.append(f"beta {st['beta']}")
    if st["guidance"] is not None:
        detail.append(f"guidance {st['guidance']}")
    detail.append(f"weighting {st['weighting']}")
    chunks = len(cfg.chunks)
    lines = [
        f"pathsmc sample: {cfg.source}",
        f"  model: {models}; "
        + (f"schedule {cfg.schedule['kind'].upper()}" + (f" ({sched})" if sched else "")
           if cfg.dim is not None else "the diffusers scheduler's chain"),
        f"  mode: {st['mode']} ({', '.join(detail)})",
        f"  {b} rows × {n} particles, {cfg.steps} steps to t = {cfg.t_end:g}, "
        f"{'dim ' + str(cfg.dim) if cfg.dim is not None else 'image states'}, "
        f"{cfg.device}, {cfg.dtype}, seed {cfg.seed}, threshold {cfg.threshold:g}, "
        f"{cfg.scheme}",
        f"  chunks: {chunks} of up to {cfg.chunk} rows"
        + (f" ({resumed} resumed from an earlier run)" if resumed else ""),
    ]
    lz = result["log_z"]
    live = lz[torch.isfinite(lz)]
    if st["mode"] == "uncorrected":
        lines.append("  log Ẑ: — (mode 'uncorrected' carries no weights)")
    elif live.numel() == 0:
        lines.append("  log Ẑ: every row died")
    else:
        mean = float(live.mean())
        if live.numel() > 1:
            sd = float(live.std())
            se = sd / math.sqrt(live.numel())
            line = (f"  log Ẑ: mean {mean:.4f}, sd {sd:.4f}, SE {se:.4f} over "
                    f"{live.numel()} live rows")
        else:
            se = math.nan
            line = f"  log Ẑ: {mean:.4f} (one row: no spread)"
        if cfg.exact_log_z is not None:
            z = (mean - cfg.exact_log_z) / se if se > 0 else math.nan
            line += f"; exact_log_z {cfg.exact_log_z:.4f}, z = {z:+.2f}"
        lines.append(line)
        if b <= 16:
            lines.append("  log Ẑ per row: " + " ".join(f"{float(v):.4f}" for v in lz))
    ess = result["ess"]
    final = ess[-1]
    lines.append(f"  ESS: final mean {float(final.mean()):.1f}/{n} (min {float(final.min()):.1f}),"
                 f" lowest over the steps {float(ess.min()):.1f}")
    nres = result["resampled"].sum(0).double()
    lines.append(f"  resampled: {float(nres.mean()):.1f} times per row (min {int(nres.min())}, "
                 f"max {int(nres.max())}) of {cfg.steps - 1} steps")
    dead = result["dead_rows"]
    if dead:
        shown = ", ".join(f"row {r} at step {s}" for r, s in sorted(dead.items())[:8])
        lines.append(f"  DEAD ROWS ({len(dead)}): {shown}")
    else:
        lines.append("  dead rows: none")
    if cfg.mode != "uncorrected" or bool(result["dead_particles"].any()):
        for w in collapse_messages(result["log_z"], ess.min(0).values, final,
                                   result["dead_particles"], n,
                                   replicates=cfg.mode != "uncorrected" and replicate_rows(cfg)):
            lines.append(f"  WARNING: {w}")
    lines.append(f"  time: {seconds:.2f} s; wrote {', '.join(files)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def run_sample(config: str | Path, *, out: str | Path | None = None, force: bool = False,
               progress: bool = True) -> int:
    """Run the job of ``config`` (``pathsmc sample``); returns the exit code (0, or 1 when a
    row died).

    Raises :class:`ConfigError` for a bad config and :class:`ResultsExistError` when ``out``
    holds results (or chunks of another job) and ``force`` is false.
    """
    cfg = load_config(config)
    if out is None:
        if cfg.out is None:
            raise ConfigError("out: no output folder (give --out or set 'out' in the config)")
        out = cfg.source.parent / cfg.out
    out = Path(out)
    with _process_group():
        return _run_job(cfg, out, force, progress)


def _run_job(cfg: JobConfig, out: Path, force: bool, progress: bool) -> int:
    rank, _ = _world()
    progress = progress and sys.stderr.isatty() and rank == 0
    with _import_dirs(cfg.import_dirs()):
        job = _resolve_job(cfg)  # before touching the folder: a bad config writes nothing
        if rank == 0:
            _prepare_folder(out, cfg, force)
        _barrier()  # the folder is ready (and, with --force, emptied) before any rank writes
        saved_threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            parts, resumed, t0 = _run_chunks(cfg, job, out, progress)
        finally:
            torch.set_num_threads(saved_threads)
    if rank != 0:
        return 0  # rank 0 writes the results
    seconds = time.perf_counter() - t0
    result = _combine(parts)
    result.update({
        "final_ess": result["ess"][-1].clone(),
        "num_resampled": result["resampled"].sum(0),
        "config": cfg.raw,
        "seeds": [p["seed"] for p in parts],
        "chunks": [tuple(p["rows"]) for p in parts],
        "seconds": seconds,
        "versions": _versions(),
    })
    files = ["result.pt"]
    _save_atomic(result, out / "result.pt")
    if cfg.format == "npz":
        _save_npz(result, out / "result.npz")
        files.append("result.npz")
    files.append("report.txt")
    report = _report(cfg, result, resumed=resumed, seconds=seconds, files=files)
    (out / "report.txt").write_text(report + "\n")
    print(report)
    return 1 if result["dead_rows"] else 0


def _run_chunks(cfg: JobConfig, job: _Job, out: Path, progress: bool
                ) -> tuple[list[dict[str, Any]], int, float]:
    from tqdm.auto import tqdm

    rank, world = _world()
    chunks = cfg.chunks
    several = len(chunks) > 1 or world > 1  # several processes meet through the chunk files
    chunk_dir = out / "chunks"
    if several:
        chunk_dir.mkdir(exist_ok=True)
    parts: dict[int, dict[str, Any]] = {}
    resumed = 0
    t0 = time.perf_counter()
    mine = [i for i in range(len(chunks)) if i % world == rank]
    with tqdm(total=len(mine), desc="chunks", disable=not (progress and several),
              file=sys.stderr, leave=False) as bar:
        for i in mine:
            rows = chunks[i]
            path = chunk_dir / f"chunk-{i:04d}.pt"
            part = _load_chunk(path, cfg, rows) if several and path.exists() else None
            if part is not None:
                resumed += 1
            else:
                part = _run_chunk(cfg, job, i, rows[0], rows[1], progress)
                if several:
                    part["fingerprint"] = cfg.fingerprint()
                    _save_atomic(part, path)
            parts[i] = part
            bar.update(1)
    if world > 1:
        import torch.distributed as dist

        count = torch.tensor([resumed])
        dist.all_reduce(count)  # also the barrier: every chunk file is written
        resumed = int(count)
        if rank == 0:
            for i, rows in enumerate(chunks):
                if i not in parts:
                    parts[i] = _load_chunk(chunk_dir / f"chunk-{i:04d}.pt", cfg, rows)
                    if parts[i] is None:
                        raise RuntimeError(f"pathsmc sample: chunk {i} of rank {i % world} is "
                                           f"missing or unreadable in {chunk_dir}")
    return [parts[i] for i in sorted(parts)], resumed, t0


def _save_npz(result: dict[str, Any], path: Path) -> None:
    import numpy as np

    dead = np.array(sorted(result["dead_rows"].items()), dtype=np.int64).reshape(-1, 2)
    arrays = {k: result[k].numpy() for k in ("particles", "logw", "log_z", "ess", "resampled",
                                             "final_ess", "num_resampled", "dead_particles")}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, dead_rows=dead, **arrays)
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    import pathsmc

    return {"pathsmc": str(pathsmc.__version__), "torch": str(torch.__version__)}
