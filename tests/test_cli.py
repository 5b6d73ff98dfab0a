"""``pathsmc sample``: a user's steering job from a config file, end to end.

The jobs are the shipped examples (``examples/steer_reward.toml``, ``examples/steer_temper.json``
with the model module ``examples/mixture_model.py``) and small configs written here; each run
is a second or less. Checked: log Ẑ near the exact value, the files and their contents,
refusal to overwrite without ``--force``, resuming an interrupted chunked job, per-row
conditions split across chunks, and config errors that name the key.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import pathsmc.commands.sample as sample_module
from pathsmc.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
K_SE = 4.5


pytestmark = pytest.mark.usefixtures("one_thread")  # small problems (conftest)


def example_config(name: str = "steer_reward.toml") -> dict:
    path = EXAMPLES / name
    if path.suffix == ".toml":
        return tomllib.loads(path.read_text())
    return json.loads(path.read_text())


def write_config(tmp_path: Path, cfg: dict, name: str = "cfg.json") -> Path:
    """A JSON copy of ``cfg`` that imports from examples/."""
    cfg = dict(cfg)
    cfg.setdefault("pythonpath", [str(EXAMPLES)])
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


def small(cfg: dict, **over) -> dict:
    """The example with small sizes."""
    out = dict(cfg)
    out.update({"particles": 64, "steps": 10, "batch": 6, "chunk": 2})
    out.update(over)
    return out


def run(*args: str) -> int:
    return main(["sample", *map(str, args), "--no-progress"])


def check_log_z(log_z: torch.Tensor, exact: float) -> None:
    n = log_z.numel()
    se = float(log_z.std()) / math.sqrt(n)
    assert abs(float(log_z.mean()) - exact) < K_SE * se + 1e-3, (log_z, exact)
    assert abs(float(log_z.mean()) - exact) < 0.2, (log_z, exact)


# ---- the shipped examples ----


def test_reward_example_end_to_end(tmp_path, capsys) -> None:
    """examples/steer_reward.toml as shipped: log Ẑ near the exact log Z of the tilt."""
    import sys

    sys.path.insert(0, str(EXAMPLES))
    try:
        import mixture_model
    finally:
        sys.path.remove(str(EXAMPLES))
    exact = mixture_model.exact_log_z((1.0, -0.5))
    cfg = example_config()
    assert cfg["exact_log_z"] == pytest.approx(exact, abs=1e-5)
    out = tmp_path / "job"
    assert run("--config", EXAMPLES / "steer_reward.toml", "--out", out) == 0
    report = capsys.readouterr().out
    assert "log Ẑ: mean" in report and "dead rows: none" in report and "z = " in report
    assert (out / "report.txt").read_text().strip() == report.strip()
    res = torch.load(out / "result.pt", weights_only=True)
    b, n, d = cfg["batch"], cfg["particles"], cfg["dim"]
    assert res["particles"].shape == (b, n, d) and res["particles"].dtype == torch.float32
    assert res["logw"].shape == (b, n) and res["log_z"].shape == (b,)
    assert res["ess"].shape == (cfg["steps"], b) and res["resampled"].shape == (cfg["steps"], b)
    assert res["dead_rows"] == {} and len(res["seeds"]) == len(res["chunks"]) == 2
    assert torch.equal(res["num_resampled"], res["resampled"].sum(0))
    check_log_z(res["log_z"], exact)
    # log Ẑ is the log mean weight of the final particles
    lz = torch.logsumexp(res["logw"], -1) - math.log(n)
    torch.testing.assert_close(lz, res["log_z"])
    # the npz holds the same arrays
    with np.load(out / "result.npz") as z:
        for key in ("particles", "logw", "log_z", "ess", "resampled", "final_ess",
                    "num_resampled"):
            np.testing.assert_array_equal(z[key], res[key].numpy())
        assert z["dead_rows"].shape == (0, 2)
    job = json.loads((out / "job.json").read_text())
    assert job["config"]["steer"]["mode"] == "reward" and len(job["chunks"]) == 2


def test_temper_json_example(tmp_path, capsys) -> None:
    """examples/steer_temper.json: an ε-prediction model tempered to p^0.5 (path-RND weights)."""
    cfg = example_config("steer_temper.json")
    out = tmp_path / "temper"
    assert run("--config", EXAMPLES / "steer_temper.json", "--out", out) == 0
    res = torch.load(out / "result.pt", weights_only=True)
    assert not (out / "result.npz").exists()  # format "pt" (the default)
    check_log_z(res["log_z"], cfg["exact_log_z"])
    assert "mode: temper" in capsys.readouterr().out


# ---- the output folder ----


def test_refuses_to_overwrite_without_force(tmp_path, capsys) -> None:
    cfg = write_config(tmp_path, small(example_config(), chunk=6))
    out = tmp_path / "out"
    assert run("--config", cfg, "--out", out) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert run("--config", cfg, "--out", out) == 2
    err = capsys.readouterr().err
    assert "already holds results" in err and "--force" in err
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert run("--config", cfg, "--out", out, "--force") == 0
    assert not (out / "chunks").exists()  # one chunk: nothing to resume, no chunk files


def test_out_from_config(tmp_path) -> None:
    """Without --out the folder is the config's 'out', relative to the config file."""
    cfg = write_config(tmp_path, small(example_config(), out="results/a", format="pt"))
    assert run("--config", cfg) == 0
    assert (tmp_path / "results" / "a" / "result.pt").is_file()


def test_resume_skips_done_chunks(tmp_path, capsys, monkeypatch) -> None:
    """A job interrupted after its first chunk resumes from the chunk files and gives the
    same result as an uninterrupted run."""
    cfg = write_config(tmp_path, small(example_config()))
    full = tmp_path / "full"
    assert run("--config", cfg, "--out", full) == 0
    ref = torch.load(full / "result.pt", weights_only=True)

    out = tmp_path / "interrupted"
    original = sample_module._run_chunk
    calls = []

    def interrupted(cfg_, job, index, start, stop, progress):
        if index == 1:
            raise KeyboardInterrupt
        calls.append(index)
        return original(cfg_, job, index, start, stop, progress)

    monkeypatch.setattr(sample_module, "_run_chunk", interrupted)
    capsys.readouterr()
    assert run("--config", cfg, "--out", out) == 130  # Ctrl-C: a message, not a trace
    err = capsys.readouterr().err
    assert "interrupted: 1/3 chunks saved; rerun to resume" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert calls == [0]
    assert (out / "chunks" / "chunk-0000.pt").is_file()
    assert not (out / "chunks" / "chunk-0001.pt").exists()
    assert not (out / "result.pt").exists()
    first = (out / "chunks" / "chunk-0000.pt").stat().st_mtime_ns

    monkeypatch.setattr(sample_module, "_run_chunk", lambda *a: (calls.append(a[2]),
                                                                  original(*a))[1])
    capsys.readouterr()
    assert run("--config", cfg, "--out", out) == 0
    assert calls == [0, 1, 2]  # chunk 0 was not run again
    assert "1 resumed" in capsys.readouterr().out
    assert (out / "chunks" / "chunk-0000.pt").stat().st_mtime_ns == first
    res = torch.load(out / "result.pt", weights_only=True)
    for key in ("particles", "logw", "log_z", "ess", "resampled"):
        assert torch.equal(res[key], ref[key]), key
    assert res["seeds"] == ref["seeds"]


def test_chunks_of_another_config_are_not_reused(tmp_path, capsys) -> None:
    cfg = small(example_config())
    path = write_config(tmp_path, cfg)
    out = tmp_path / "out"
    assert run("--config", path, "--out", out) == 0
    for name in ("result.pt", "result.npz", "report.txt"):
        (out / name).unlink()
    changed = write_config(tmp_path, dict(cfg, seed=7), name="changed.json")
    capsys.readouterr()
    assert run("--config", changed, "--out", out) == 2
    assert "different job" in capsys.readouterr().err
    assert run("--config", changed, "--out", out, "--force") == 0
    # report-only keys do not invalidate the chunks
    for name in ("result.pt", "result.npz", "report.txt"):
        (out / name).unlink(missing_ok=True)
    same = write_config(tmp_path, dict(cfg, seed=7, exact_log_z=3.0, format="pt"),
                        name="same.json")
    capsys.readouterr()
    assert run("--config", same, "--out", out) == 0
    assert "3 resumed" in capsys.readouterr().out


MODEL_MODULE = '''
import torch

def factory(offsets):
    """Data N(μ_c, I) for condition c (a row index into offsets); VP keeps unit variance,
    so p_t = N(m(t) μ_c, I) and the score is −(x − m μ_c)."""
    from pathsmc.diffusion import VPSchedule
    sched = VPSchedule()
    mu = torch.tensor(offsets, dtype=torch.float64)

    def score(x, t, cond):
        m = sched.mean_coef(t)
        return -(x.double() - m * mu[cond][:, None, :])

    return score

def reward(x):
    return x.double()[..., 0]
'''


def test_per_row_conditions_are_split_with_the_chunks(tmp_path) -> None:
    """A user module next to the config, a conditional model, rows with their own exact log Z
    (θ·μ_b + |θ|²/2 with θ = e_1): wrong rows in a chunk would be off by 1 or more."""
    (tmp_path / "my_model.py").write_text(MODEL_MODULE)
    offsets = [[0.0, 0.0], [1.0, 0.0], [2.0, 1.0], [3.0, -1.0]]
    cfg = {"particles": 256, "steps": 40, "batch": 4, "chunk": 2, "dim": 2, "seed": 3,
           "model": {"path": "my_model:factory", "args": {"offsets": offsets},
                     "condition": [0, 1, 2, 3]},
           "steer": {"mode": "reward", "reward": "my_model:reward", "guidance": 1.0}}
    path = tmp_path / "cond.toml"
    path.write_text(_toml(cfg))
    out = tmp_path / "out"
    assert run("--config", path, "--out", out) == 0
    res = torch.load(out / "result.pt", weights_only=True)
    exact = torch.tensor([o[0] + 0.5 for o in offsets], dtype=torch.float64)
    assert float((res["log_z"] - exact).abs().max()) < 0.25, (res["log_z"], exact)


def _toml(cfg: dict) -> str:
    """A tiny TOML writer for the test configs (scalars, lists, one level of tables)."""

    def val(v) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    lines = [f"{k} = {val(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {val(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


# ---- config errors ----


def _set(cfg: dict, dotted: str, value) -> dict:
    cfg = json.loads(json.dumps(cfg))
    *parents, last = dotted.split(".")
    table = cfg
    for p in parents:
        table = table[p]
    if value is _DELETE:
        del table[last]
    else:
        table[last] = value
    return cfg


_DELETE = object()

BAD = [
    ("partcles", 64, "partcles"),  # a typo: named, with the suggestion
    ("particles", 0, "particles"),
    ("dim", _DELETE, "dim"),
    ("batch", 2.5, "batch"),
    ("threshold", -1, "threshold"),
    ("scheme", "roulette", "scheme"),
    ("format", "csv", "format"),
    ("dtype", "float16", "dtype"),
    ("t_end", 1.0, "t_end"),
    ("model.path", "no_such_module_xyz:score", "model.path"),
    ("model.path", "mixture_model:nope", "model.path"),
    ("model.path", "mixture_model.score", "model.path"),
    ("model.prediction", "velocity", "model.prediction"),
    ("model.colour", 1, "model.colour"),
    ("schedule.kind", "cosine", "schedule.kind"),
    ("schedule.beta_min", -1.0, "schedule.beta_min"),
    ("schedule.sigma_max", 3.0, "schedule.sigma_max"),  # a VE key in a VP schedule
    ("steer.mode", "magic", "steer.mode"),
    ("steer.reward", _DELETE, "steer.reward"),
    ("steer.reward_args", {"thet": [1.0, 0.0]}, "steer.reward_args"),
    ("steer.potential", "min", "steer.potential"),
    ("steer.beta", 0.5, "steer.beta"),  # not used by mode reward
    ("steer.weighting", "density", "model.log_prob"),  # density needs the exact log p_t
]


@pytest.mark.parametrize("key,value,named", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_config_names_the_key(tmp_path, capsys, key: str, value, named: str) -> None:
    cfg = small(example_config())
    cfg = _set(cfg, key, value) if "." in key or value is _DELETE else dict(cfg, **{key: value})
    path = write_config(tmp_path, cfg)
    out = tmp_path / "out"
    assert run("--config", path, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("pathsmc sample: error: ") and named in err, err
    assert not out.exists()  # a bad config writes nothing


def test_bad_config_files(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("particles = [\n")
    assert run("--config", bad, "--out", tmp_path / "o") == 2
    assert "cannot parse" in capsys.readouterr().err
    assert run("--config", tmp_path / "missing.toml", "--out", tmp_path / "o") == 2
    assert "no such file" in capsys.readouterr().err
    yml = tmp_path / "job.yaml"
    yml.write_text("particles: 1\n")
    assert run("--config", yml, "--out", tmp_path / "o") == 2
    assert ".toml or .json" in capsys.readouterr().err
    cfg = write_config(tmp_path, small(example_config(), steer={"mode": "temper"}))
    assert run("--config", cfg, "--out", tmp_path / "o") == 2
    assert "steer.beta" in capsys.readouterr().err
    cfg = write_config(tmp_path, small(example_config(), steer={"mode": "product",
                                                                "beta": [1.0, 1.0]}))
    assert run("--config", cfg, "--out", tmp_path / "o") == 2
    assert "model: mode 'product' needs two or more models" in capsys.readouterr().err
    no_out = write_config(tmp_path, small(example_config()), name="no_out.json")
    assert run("--config", no_out) == 2
    assert "out" in capsys.readouterr().err


# ---- the command line's manners: errors, devices, folders, help ----


def test_user_error_names_the_function(tmp_path, capsys) -> None:
    """An exception in the user's model prints a few lines naming the function; --debug
    gives the full traceback (the exception propagates)."""
    (tmp_path / "broken_model.py").write_text(
        "def score(x, t):\n    raise ValueError('my model is broken')\n")
    cfg = write_config(tmp_path, small(example_config(), model={"path": "broken_model:score",
                                                               "prediction": "score"},
                                       pythonpath=[str(EXAMPLES), str(tmp_path)]))
    assert run("--config", cfg, "--out", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "score()" in err and "broken_model.py" in err and "my model is broken" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 4, err
    with pytest.raises(ValueError, match="my model is broken"):
        run("--config", cfg, "--out", tmp_path / "o2", "--debug")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_is_refused_before_any_work(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit, match="CUDA is not available"):
        main(["demo", "--device", "cuda", "--out", str(tmp_path / "d")])
    cfg = write_config(tmp_path, small(example_config(), device="cuda"))
    with pytest.raises(SystemExit, match=r"CUDA is not available .*set device = \"cpu\" in"):
        run("--config", cfg, "--out", tmp_path / "o")
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()


def test_out_that_is_a_file_is_an_error(tmp_path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        main(["demo", "--out", str(a_file)])
    cfg = write_config(tmp_path, small(example_config()))
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        run("--config", cfg, "--out", a_file)


def test_python_m_version_and_help_defaults() -> None:
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    out = subprocess.run([sys.executable, "-m", "pathsmc", "--version"], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert out.strip() == "pathsmc " + __import__("pathsmc").__version__
    helptext = subprocess.run([sys.executable, "-m", "pathsmc", "demo", "--help"],
                              capture_output=True, text=True, env=env, check=True).stdout
    assert "(default: 1024)" in " ".join(helptext.split())


def test_load_config_defaults() -> None:
    cfg = sample_module.load_config(EXAMPLES / "steer_temper.json")
    assert cfg.mode == "temper" and cfg.steer["beta"] == 0.5 and cfg.chunk == cfg.batch == 8
    assert cfg.chunks == [(0, 8)] and cfg.scheme == "systematic" and cfg.threshold == 0.5
    assert cfg.models[0].prediction == "eps" and cfg.schedule["kind"] == "vp"
    assert sample_module.chunk_seed(0, 1) != sample_module.chunk_seed(0, 0)
    assert sample_module.chunk_seed(5, 2) == sample_module.chunk_seed(5, 2)


def test_samplers_table(capsys, restore_threads):
    from pathsmc.cli import main

    assert main(["samplers", "--particles", "256", "--rows", "8", "--no-pt"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["target", "method", "log"]
    rows = [line for line in out[1:] if "SMC" in line]
    assert len(rows) == 10  # 5 targets × (annealed SMC, waste-free SMC)
    for line in rows:
        if line.startswith(("many-well d=8", "40-mode")):  # easy targets: no visible bias
            assert abs(float(line.split()[-3])) < 5, line
    with pytest.raises(SystemExit):
        main(["samplers", "--rows", "1"])


# ---- several processes (torchrun) ----


def _sample_rank(rank: int, world: int, port: int, cfg: str, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    code = main(["sample", "--config", cfg, "--out", out, "--no-progress"])
    Path(out, f"exit-{rank}").write_text(str(code))


def test_chunks_dealt_to_several_processes(tmp_path, capsys) -> None:
    """Under torchrun the ranks share the chunks (round-robin) and rank 0 combines them: the
    same result as one process, since every chunk is seeded by its index."""
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    cfg = write_config(tmp_path, small(example_config()))  # 6 rows, chunks of 2: 3 chunks
    assert run("--config", cfg, "--out", tmp_path / "one") == 0
    ref = torch.load(tmp_path / "one" / "result.pt", weights_only=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "two"
    mp.spawn(_sample_rank, args=(2, port, str(cfg), str(out)), nprocs=2, join=True)
    assert [(out / f"exit-{r}").read_text() for r in range(2)] == ["0", "0"]
    res = torch.load(out / "result.pt", weights_only=True)
    for key in ("particles", "logw", "log_z", "ess", "resampled"):
        assert torch.equal(res[key], ref[key]), key
    assert res["seeds"] == ref["seeds"] and res["chunks"] == ref["chunks"]
    assert sorted(p.name for p in (out / "chunks").iterdir()) == [
        "chunk-0000.pt", "chunk-0001.pt", "chunk-0002.pt"]
    assert (out / "report.txt").read_text().startswith("pathsmc sample")
