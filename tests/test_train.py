import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medvit.config import load_config
from medvit.core.errors import InputError
from pipelines.volume.train import SeededSamples, lr_factor, split_random, train
from tests.helpers import tiny_config, write_tiny_set


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("phantoms")
    return write_tiny_set(folder)


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, warmup=4, total=20) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[-1] < 0.05


def test_train_writes_checkpoints_and_metrics(tiny_set, tmp_path):
    cfg = load_config(tiny_config(tmp_path, tiny_set, epochs=2))
    res = train(cfg, progress=False)
    out = Path(cfg.train.output_dir)
    for name in ("best.safetensors", "best.json", "last.safetensors", "last.json", "last_state.pt"):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert all(r["loss"] > 0 and 0 <= r["val_mean_dice"] <= 1 for r in lines)
    assert set(lines[0]["val_dice"]) == {"liver", "spleen", "kidney", "spine", "lung"}
    assert res.global_step == 8 and res.best_epoch in (1, 2)
    assert not list(out.glob("*.tmp*")), "temporary files left behind"


def test_gradient_accumulation_steps_once_per_group(tiny_set, tmp_path):
    cfg = load_config(tiny_config(tmp_path, tiny_set, epochs=1, accumulate=2, warmup_epochs=0))
    res = train(cfg, progress=False)
    assert res.global_step == 2  # 4 batches of 1, one optimiser step per 2
    rec = json.loads((Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 2


def test_random_chain_is_seeded_per_sample(tiny_set, tmp_path):
    from medvit.transforms import train_transforms

    cfg = load_config(tiny_config(tmp_path, tiny_set))
    fixed, rand = split_random(train_transforms(cfg))
    from medvit.data.datalist import read_datalist

    items = [fixed(x) for x in read_datalist(cfg.train.datalist)[:2]]
    ds = SeededSamples(items, rand, seed=3)
    a1, b1 = ds[1], ds[0]
    a2 = ds[1]
    assert torch.equal(a1[0]["image"], a2[0]["image"])  # same (epoch, index) → same crop
    ds.epoch = 1
    assert not torch.equal(ds[1][0]["image"], a1[0]["image"])  # next epoch → another crop


def test_resume_without_state_is_an_input_error(tiny_set, tmp_path):
    cfg = load_config(tiny_config(tmp_path, tiny_set))
    with pytest.raises(InputError, match="nothing to resume"):
        train(cfg, resume=True, progress=False)


def _run(args, env):
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_run_resumes_to_identical_weights(tiny_set, tmp_path):
    """A run killed mid-epoch and resumed ends with the same weights as one never stopped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = dict(epochs=3, checkpoint_every=1, val_every=3)
    ref_cfg = tiny_config(tmp_path, tiny_set, out="ref", **args)
    cut_cfg = tiny_config(tmp_path, tiny_set, out="cut", **args)
    ref = _run(["train", str(ref_cfg), "--no-progress"], env)

    victim = _run(["train", str(cut_cfg), "--no-progress"], env)
    state = tmp_path / "cut" / "last_state.pt"
    killed_at = None
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        if state.is_file():
            step = torch.load(state, weights_only=True)["global_step"]
            if step >= 3:
                victim.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.05)
    victim.wait()
    assert killed_at is not None and killed_at < 12, "the run finished before it could be killed"
    resumed = _run(["train", str(cut_cfg), "--resume", "--no-progress"], env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    a = torch.load(tmp_path / "ref" / "last_state.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last_state.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    last_ref = json.loads((tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()[-1])
    last_cut = json.loads((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last_ref["val_mean_dice"] == last_cut["val_mean_dice"]
