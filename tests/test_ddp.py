"""Training on several processes (DDP over gloo on the CPU): the same steps as one process with the
same global batch, exact resume, rank 0 alone writing, and both ``train`` commands under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medvit.core.config import TrainConfig
from medvit.core.errors import InputError, MedvitError
from pipelines.ddp import World, shard, world_from_env
from pipelines.fit import SeededSamples, fit, prepare_output
from tests.helpers import blob_batch, tiny_config, write_tiny_set

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


class BlobTask:
    """Eight volumes with two boxes, no random augmentation, DiceCE; records each batch's loss.
    ``nan_at``: the batch (counted from 0 in this run) whose loss is NaN, on rank ``nan_rank`` only."""

    metric, per_label, collate = "mean_dice", "dice", None

    def __init__(self, nan_at: int | None = None, rank: int = 0, nan_rank: int = 1):
        from pipelines.volume.train import SegmentationLoss

        x, y = blob_batch(8, size=(16, 32, 32))
        self.items = [{"image": x[i], "label": y[i]} for i in range(len(x))]
        self.loss_fn, self.losses, self.saved = SegmentationLoss(), [], []
        self.nan = nan_at if rank == nan_rank else None

    def train_samples(self) -> SeededSamples:
        from monai.transforms import Compose

        return SeededSamples(self.items, Compose([]), seed=0)

    def loss(self, net, batch, device):
        loss = self.loss_fn(net(batch["image"].to(device)), batch["label"].to(device))
        if len(self.losses) == self.nan:
            loss = loss * float("nan")
        self.losses.append(float(loss.detach()))
        return loss

    def validate(self, net, device, amp):
        """Minus the mean loss over all eight volumes, so a later epoch scores better."""
        net.eval()
        with torch.no_grad():
            x, y = (torch.stack([i[k] for i in self.items]) for k in ("image", "label"))
            loss = self.loss_fn(net(x.to(device)), y.to(device))
        return {"score": -float(loss), "per_label": {}}

    def save(self, net, path: Path, extra) -> None:
        self.saved.append(Path(path).name)
        torch.save(net.state_dict(), path)


def tiny_unet() -> torch.nn.Module:
    """MONAI's UNet, small: instance norm only, so no statistic crosses the samples of a batch; three
    levels and no convolution bias before a norm (whose gradient is zero but for rounding): AdamW's
    first steps move every weight by about lr whatever its gradient, so a weight of next to no
    gradient (a bias before a norm, a bottleneck of a few voxels) turns rounding into lr-sized
    differences, in one process alone as much as across ranks."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, bias=False)


def train_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(datalist=out / "unused.json", output_dir=out, epochs=2, lr=3e-3, accumulate=2, warmup_epochs=1)
    return TrainConfig(**{**base, **kw})


def _fit_blobs(rank: int, out: str, batch_size: int, resume: bool = False, nan_at: int | None = None,
               **kw) -> None:
    """One rank's (or the single process's) run: writes its batch losses, the files it saved and
    the message of a user error that stopped it."""
    task, tc = BlobTask(nan_at, rank), train_cfg(Path(out), batch_size=batch_size, **kw)
    prepare_output(tc, resume=resume)
    error, best = None, None
    try:
        res = fit(task, tiny_unet(), tc, resume=resume, progress=False)
        best = [res.best_metric, res.best_epoch]
    except MedvitError as e:
        error = str(e)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"losses": task.losses, "saved": task.saved, "best": best}))
    if error is not None:
        (Path(out) / f"rank{rank}.error").write_text(error)


def _rank_main(rank: int, world: int, store: str, kwargs: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        _fit_blobs(rank, **kwargs)
        dist.barrier()  # as pipelines.ddp.distributed: leave together
    finally:
        dist.destroy_process_group()


def on_ranks(world: int, store: Path, **kwargs) -> None:
    """``_fit_blobs(**kwargs)`` on ``world`` spawned processes joined over gloo."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(world, str(store), kwargs), nprocs=world, start_method="spawn")


def ran(out: Path, rank: int) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


def test_shard_deals_as_distributed_sampler():
    from torch.utils.data import DistributedSampler

    for n, world in ((10, 3), (8, 2), (2, 4), (7, 1)):
        order = list(range(n))
        parts = [shard(order, r, world) for r in range(world)]
        want = [list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
        assert parts == want
        assert len({len(p) for p in parts}) == 1 and set().union(*parts) == set(order)
    assert shard([5, 3, 9, 1], 1, 2) == [3, 1]  # any order is dealt, not sorted


def test_world_from_env():
    assert world_from_env({}) == World()
    w = world_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.main) == (3, 4, 1, 2, False)
    with pytest.raises(Exception, match="RANK=4"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "2"})


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Two ranks of batch 1 against one process of batch 2 (accumulating 2 batches a step), an
    uninterrupted 2-rank run, and one cut by a NaN loss on rank 1 after its first resume checkpoint,
    then resumed."""
    root = tmp_path_factory.mktemp("ddp")
    _fit_blobs(0, str(root / "one"), batch_size=2)
    on_ranks(2, root / "s1", out=str(root / "two"), batch_size=1)
    on_ranks(2, root / "s2", out=str(root / "cut"), batch_size=1, checkpoint_every=1, nan_at=3)
    for r in (0, 1):
        (root / "cut" / f"rank{r}.error").rename(root / f"cut{r}.error")
    on_ranks(2, root / "s3", out=str(root / "cut"), batch_size=1, checkpoint_every=1, resume=True)
    return root


def test_two_ranks_take_the_steps_of_one_process(ddp_runs):
    one, two = ran(ddp_runs / "one", 0), [ran(ddp_runs / "two", r) for r in (0, 1)]
    assert len(one["losses"]) == 8 and all(len(t["losses"]) == 8 for t in two)  # 2 epochs of 4 batches
    # each rank's batch is half the single process's: their mean is its mean-reduced loss
    for k, want in enumerate(one["losses"]):
        got = (two[0]["losses"][k] + two[1]["losses"][k]) / 2
        assert got == pytest.approx(want, abs=1e-5), k
    assert one["losses"][-1] < one["losses"][0] - 0.05  # it learns: the comparison is not of constants
    a = torch.load(ddp_runs / "one" / "last_state.pt", weights_only=True)
    b = torch.load(ddp_runs / "two" / "last_state.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-5, msg=k)


def test_rank_zero_alone_validates_and_writes(ddp_runs):
    zero, one = ran(ddp_runs / "two", 0), ran(ddp_runs / "two", 1)
    assert zero["saved"] == ["best.safetensors", "last.safetensors"] * 2  # the score rises: best twice
    assert one["saved"] == []
    assert one["best"] == zero["best"] and zero["best"][1] == 2  # rank 0's verdict reached rank 1
    lines = (ddp_runs / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    assert json.loads(lines[-1])["val_mean_dice"] == pytest.approx(zero["best"][0])
    st = torch.load(ddp_runs / "two" / "last_state.pt", weights_only=True)
    assert st["world_size"] == 2 and len(st["rng_ranks"]) == 2


def test_nan_loss_on_one_rank_stops_both(ddp_runs):
    said = [(ddp_runs / f"cut{r}.error").read_text() for r in (0, 1)]
    assert said[1] == ("training diverged: the loss is nan at epoch 1, batch 4; lower train.lr (now 0.003) "
                       "or check the data")
    assert said[0].startswith("training diverged: the loss is NaN or inf on another rank at epoch 1, batch 4")


def test_cut_run_resumes_on_two_ranks_to_the_same_weights(ddp_runs):
    assert len(ran(ddp_runs / "cut", 0)["losses"]) == 6  # the resumed part: batches 3..8 (stopped at 4, saved after 2)
    ref = torch.load(ddp_runs / "two" / "last_state.pt", weights_only=True)
    got = torch.load(ddp_runs / "cut" / "last_state.pt", weights_only=True)
    assert got["global_step"] == 4
    for k, v in ref["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert [json.loads(x)["epoch"] for x in (ddp_runs / "cut" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_on_another_number_of_ranks_is_refused(ddp_runs, tmp_path):
    shutil.copy(ddp_runs / "two" / "last_state.pt", tmp_path / "last_state.pt")  # a run of 2 ranks
    with pytest.raises(InputError, match=r"saved by a run on 2 process\(es\), this one has 1; resume it with "
                                         r"torchrun --nproc_per_node=2"):
        fit(BlobTask(), tiny_unet(), train_cfg(tmp_path, batch_size=1), resume=True, progress=False)


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "pipelines.cli", *args],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_train_under_torchrun_writes_once_and_resumes(tmp_path):
    dl = write_tiny_set(tmp_path, n_train=4, n_val=1, n_test=0)
    cfg = tiny_config(tmp_path, dl, epochs=1)
    r = torchrun(["train", str(cfg), "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained 1 epochs, 2 steps") == 1, r.stdout  # 4 cases, 2 ranks of batch 1
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1] and 0 <= lines[0]["val_mean_dice"] <= 1
    assert (tmp_path / "run" / "best.safetensors").is_file()
    y = yaml.safe_load(cfg.read_text())
    y["train"]["epochs"] = 2
    cfg.write_text(yaml.safe_dump(y))
    r = torchrun(["train", str(cfg), "--resume", "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained 2 epochs, 4 steps") == 1, r.stdout
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not list((tmp_path / "run").glob(".*.tmp*"))


def test_lidar_train_under_torchrun(tmp_path):
    from tests.helpers import TINY_LIDAR, lidar_train_set

    dl = lidar_train_set(tmp_path)
    cfg = {**TINY_LIDAR, "augment": {"crop_points": 2000, "crop_size": 20.0},
           "train": {"datalist": str(dl), "output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 1, "lr": 3e-3}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = torchrun(["lidar", "train", str(p), "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained 1 epochs") == 1, r.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and 0 <= lines[0]["val_miou"] <= 1


def test_pretrain_under_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    from tests.helpers import assert_user_error

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert_user_error(["pretrain", str(tmp_path / "c.yaml")], capsys, "pretrain runs in one process", "without torchrun")
