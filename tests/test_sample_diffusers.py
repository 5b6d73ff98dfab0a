"""``pathsmc sample`` with a diffusers model (``[model] kind = "diffusers"``): the job equals
steer() on the same DiffusersModel with the chunks' seeds, row conditions are split with the
chunks, and configs that mix in keys the scheduler's chain fixes name the key."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from pathsmc.cli import main  # noqa: E402
from pathsmc.commands.sample import chunk_seed  # noqa: E402
from pathsmc.diffusion import steer  # noqa: E402

MODULE = '''
import diffusers, torch
from pathsmc.integrations.diffusers import DiffusersModel

def make(seed=0, classes=3):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
        num_class_embeds=classes).eval()
    return DiffusersModel(unet, diffusers.DDPMScheduler(num_train_timesteps=100))

MODEL = make()

def reward(im):
    return 2.0 * im[..., 0, :4, :4].flatten(2).mean(-1).double()

def score(x, t):
    return -x
'''

JOB = {"particles": 16, "batch": 4, "chunk": 2, "steps": 5, "seed": 7,
       "model": {"kind": "diffusers", "path": "tiny_unet:make", "args": {"seed": 1},
                 "condition": [0, 1, 2, 0]},
       "steer": {"mode": "reward", "reward": "tiny_unet:reward"}}


def _run(tmp_path, cfg: dict) -> int:
    (tmp_path / "tiny_unet.py").write_text(MODULE)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(cfg))
    return main(["sample", "--config", str(path), "--out", str(tmp_path / "out")])


def test_job_equals_steer_on_the_chunks(tmp_path, capsys) -> None:
    assert _run(tmp_path, JOB) == 0
    res = torch.load(tmp_path / "out" / "result.pt", weights_only=True)
    assert res["particles"].shape == (4, 16, 1, 8, 8)
    assert torch.isfinite(res["log_z"]).all()
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        import tiny_unet
    finally:
        sys.path.remove(str(tmp_path))
    model = tiny_unet.make(seed=1)
    labels = torch.tensor(JOB["model"]["condition"])
    for i, (a, b) in enumerate([(0, 2), (2, 4)]):
        direct = steer(model.with_condition(class_labels=labels[a:b]), "reward",
                       reward=tiny_unet.reward, particles=16, batch=2, steps=5,
                       seed=chunk_seed(7, i), replicates=False)
        torch.testing.assert_close(res["log_z"][a:b], direct.log_z.double())
        torch.testing.assert_close(res["particles"][a:b], direct.particles)
    report = (tmp_path / "out" / "report.txt").read_text()
    assert "diffusers" in report and "image states" in report


def test_a_scalar_condition_is_every_rows_label(tmp_path) -> None:
    cfg = json.loads(json.dumps(JOB))
    cfg["model"]["condition"] = 2
    cfg["chunk"] = 4
    assert _run(tmp_path, cfg) == 0
    res = torch.load(tmp_path / "out" / "result.pt", weights_only=True)
    import sys
    sys.path.insert(0, str(tmp_path))
    import tiny_unet
    sys.path.remove(str(tmp_path))
    direct = steer(tiny_unet.make(seed=1).with_condition(class_labels=torch.full((4,), 2)),
                   "reward", reward=tiny_unet.reward, particles=16, batch=4, steps=5,
                   seed=chunk_seed(7, 0), replicates=False)
    torch.testing.assert_close(res["log_z"], direct.log_z.double())


BAD = [
    ({"model.prediction": "eps"}, "model.prediction: not used with kind = 'diffusers'"),
    ({"dim": 64}, "dim: not used with kind = 'diffusers'"),
    ({"schedule": {"kind": "vp"}}, "schedule: not used"),
    ({"model.path": "tiny_unet:score", "model.args": None},
     "model.path: kind = 'diffusers' needs a DiffusersModel, but tiny_unet:score is a function"),
    ({"model.kind": "jax"}, "model.kind"),
    ({"steer.weighting": "density"}, "model.log_prob"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m[:20] for _, m in BAD])
def test_bad_diffusers_config_names_the_key(tmp_path, capsys, change, message) -> None:
    cfg = json.loads(json.dumps(JOB))
    for key, value in change.items():
        table, _, sub = key.partition(".")
        target = cfg[table] if sub else cfg
        name = sub or table
        if value is None:
            target.pop(name)
        else:
            target[name] = value
    assert _run(tmp_path, cfg) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()
