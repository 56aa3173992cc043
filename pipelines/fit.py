"""One training loop for both sides (volumes and scenes): ``fit(task, net, train_cfg)``.

AdamW with linear warm-up then cosine decay, optional autocast on CUDA, gradient
accumulation, validation every N epochs, best and last checkpoints written atomically, a
``metrics.jsonl`` log, a tqdm bar with loss and ETA, and exact resume.

Exact resume rests on one rule: every random draw is seeded from ``(seed, epoch)`` or
``(seed, epoch, sample index)``, never carried from draw to draw. The shuffle order of an
epoch comes from a generator seeded by ``(seed, epoch)``; the random augmentation of one
sample from ``(seed, epoch, index)`` (the task's dataset does that, see
:class:`SeededSamples`). A run restarted from its last resume checkpoint therefore sees the
same next batch as the run that was killed, whatever the number of loader workers.

A *task* supplies what differs between the sides: the training samples, how a batch
becomes a loss, validation, and how a checkpoint is written.

Under torchrun (a process group initialised, :func:`pipelines.ddp.distributed`) the same loop
runs on every rank with the net in ``DistributedDataParallel``. ``batch_size`` is per process,
so a step's global batch is ranks × ``batch_size`` (the learning rate is not scaled); the epoch's
global order is the one above, dealt out by :func:`pipelines.ddp.shard` (padded as
``DistributedSampler`` pads it), so every rank runs the same number of batches and of
accumulation boundaries, and the gradients are averaged over ranks only at a boundary. Rank 0
alone validates (the others wait for its verdict), writes checkpoints and ``metrics.jsonl`` and
shows progress; a non-finite loss on any rank stops every rank. The resume checkpoint holds
every rank's RNG state and the number of ranks; a run resumes on as many ranks as it was saved by.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from medvit.core.config import TrainConfig
from medvit.core.errors import InputError, MedvitError, NonFiniteOutput
from medvit.core.files import atomic_path, check_writable, make_output_folder
from medvit.core.weights import nonfinite_key
from pipelines.ddp import shard
from pipelines.engine.settings import autocast_dtype
from pipelines.threads import AdaptiveThreads

if TYPE_CHECKING:
    from monai.transforms import Compose

logger = logging.getLogger(__name__)

STATE_FILE = "last_state.pt"


class Task(Protocol):
    metric: str
    """Name of the validation score that picks the best checkpoint (higher is better), e.g. mean_dice."""
    per_label: str
    """Name of the per-label scores in the log, e.g. dice or iou."""
    collate: Callable | None

    def train_samples(self) -> SeededSamples: ...

    def loss(self, net: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor: ...

    def validate(self, net: torch.nn.Module, device: torch.device, amp: bool) -> dict[str, Any] | None:
        """``{"score": float, "per_label": {name: float | None}}``, or None without validation data."""

    def save(self, net: torch.nn.Module, path: Path, extra: dict[str, Any]) -> None: ...


def _mix(*parts: int) -> int:
    """A 31-bit seed from several integers (stable across runs and platforms)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


class SeededSamples(torch.utils.data.Dataset):
    """Applies a random chain to cached samples with a seed fixed by (seed, epoch, index)."""

    def __init__(self, base: torch.utils.data.Dataset, chain: Compose, seed: int):
        self.base, self.chain, self.seed, self.epoch = base, chain, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        self.chain.set_random_state(seed=_mix(self.seed, self.epoch, index))
        return self.chain(self.base[index])


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` optimiser steps, then cosine decay to zero at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


@dataclass
class TrainResult:
    output_dir: Path
    best_metric: float | None
    best_epoch: int | None
    epochs_run: int
    global_step: int


def _autocast(device: torch.device, enabled: bool):
    """Autocast on CUDA in :func:`~pipelines.engine.settings.autocast_dtype` when ``enabled``; off otherwise."""
    dtype = autocast_dtype(device) if enabled else None
    if dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and ints, so the file loads with ``weights_only=True``."""
    _, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_key, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_key.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "key": torch.tensor(py_key, dtype=torch.int64), "gauss": py_gauss},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["key"].tolist()), p["gauss"]))


def _save_state(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


RUN_FILES = (STATE_FILE, "metrics.jsonl", "best.safetensors", "best.json", "last.safetensors", "last.json")
"""What a run writes in its output folder."""

STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "batch_in_epoch", "global_step", "best_metric",
              "best_epoch", "rng")


def prepare_output(tc: TrainConfig, *, resume: bool, restart: bool = False) -> Path:
    """The output folder, made and checked before any data is read: it must be writable, hold a
    run to resume with ``resume``, and hold none without (two runs would mix in one metrics log,
    and a stale best checkpoint would outlive them) unless ``restart`` removes the earlier run's files.
    A refused resume creates nothing."""
    state_path = Path(tc.output_dir) / STATE_FILE
    if resume and not state_path.is_file():  # before the folder is made: a refused resume leaves nothing behind
        where = "no resume checkpoint in the output folder" if state_path.parent.is_dir() else "the output folder does not exist"
        raise InputError(state_path, f"nothing to resume: {where}")
    out = make_output_folder(Path(tc.output_dir))
    check_writable(out / STATE_FILE)  # an unwritable folder fails now, not after an epoch
    for stale in out.glob(".*.tmp-*"):  # atomic_path's temporary files, left by a run killed mid-write
        stale.unlink(missing_ok=True)
    state_path = out / STATE_FILE
    if not resume and state_path.exists():
        if not restart:
            raise InputError(out, f"already holds a training run ({STATE_FILE}); add --resume to continue it, "
                                  "or choose another output folder")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    return out


@contextlib.contextmanager
def prepared_output(tc: TrainConfig, *, resume: bool, restart: bool = False) -> Iterator[Path]:
    """:func:`prepare_output` around a whole training run: a folder it made that is still empty
    when the run fails (say, a bad case found while the data is read) is removed again."""
    target = Path(tc.output_dir).absolute()
    made = [d for d in (target, *target.parents) if not d.exists()]  # deepest first
    try:
        yield prepare_output(tc, resume=resume, restart=restart)
    except BaseException:
        for d in made:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise


def _load_state(path: Path, net: torch.nn.Module) -> dict[str, Any]:
    from medvit.core.weights import check_fit, load_torch_file

    st = load_torch_file(path)
    missing = [k for k in STATE_KEYS if not isinstance(st, dict) or k not in st]
    if missing:
        raise InputError(path, f"not a resume checkpoint of this trainer (no '{missing[0]}')")
    check_fit(path, st["model"], net, f"the config's net ({type(net).__name__})")
    return st


def _world() -> tuple[int, int]:
    """(rank, number of ranks) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fit(task: Task, net: torch.nn.Module, tc: TrainConfig, *, device: str | torch.device = "cpu",
        resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``net`` on ``task`` with the settings ``tc``; see the module docstring. Run it inside
    :func:`prepared_output`, which checks the output folder before the task reads its data.
    Under an initialised process group ``device`` is this rank's, and ``net`` is wrapped here."""
    device = torch.device(device)
    rank, world = _world()
    main = rank == 0
    out = Path(tc.output_dir)
    state_path = out / STATE_FILE
    train_ds = task.train_samples()
    model = net.to(device)  # the bare net: validated, saved and loaded; `net` is what trains
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    batches_per_epoch = math.ceil(math.ceil(len(train_ds) / world) / tc.batch_size)
    if tc.max_steps_per_epoch:
        batches_per_epoch = min(batches_per_epoch, tc.max_steps_per_epoch * tc.accumulate)
    steps_per_epoch = math.ceil(batches_per_epoch / tc.accumulate)
    total_steps = steps_per_epoch * tc.epochs
    warmup = steps_per_epoch * tc.warmup_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup=warmup, total=total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=tc.amp and autocast_dtype(device) == torch.float16)

    epoch, batch_in_epoch, global_step = 0, 0, 0
    best_metric, best_epoch = None, None
    if resume:
        st = _load_state(state_path, model)
        saved_world = int(st.get("world_size", 1))
        if saved_world != world:  # each rank's share of an epoch and the step count depend on it
            how = "without torchrun" if saved_world == 1 else f"with torchrun --nproc_per_node={saved_world} (in all)"
            raise InputError(state_path, f"was saved by a run on {saved_world} process(es), this one has {world}; "
                                         f"resume it {how}")
        model.load_state_dict(st["model"])
        try:
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            scaler.load_state_dict(st["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise InputError(state_path, f"its optimiser state does not fit this run ({' '.join(str(e).split())[:120]})") from None
        saved_lr = opt.param_groups[0].get("initial_lr", tc.lr)
        if not math.isclose(saved_lr, tc.lr, rel_tol=1e-9):  # the schedule restored is the saved run's
            logger.warning("resuming with the saved run's learning rate %g; train.lr %g applies to new runs only",
                        saved_lr, tc.lr)
        epoch, batch_in_epoch, global_step = st["epoch"], st["batch_in_epoch"], st["global_step"]
        best_metric, best_epoch = st["best_metric"], st["best_epoch"]
        _set_rng_state(st["rng_ranks"][rank] if "rng_ranks" in st else st["rng"])
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # some nets hold parameters a training forward leaves unused (UNETR's ViT, a decoder's eval-only
        # head): DDP must look for them each step, or it waits for their gradients forever
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True)

    log_path = out / "metrics.jsonl"
    amp = tc.amp and device.type == "cuda"
    bar = tqdm(total=total_steps, initial=global_step, disable=not (progress and main), desc="train", unit="step", dynamic_ncols=True)

    def log(record: dict[str, Any]) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_resume_point() -> None:
        rngs = [_rng_state()]
        if world > 1:  # every rank's dropout stream, for an exact resume on each
            rngs = [None] * world if main else None
            dist.gather_object(_rng_state(), rngs, dst=0)
        if not main:
            return
        _save_state(
            state_path,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "global_step": global_step,
                "best_metric": best_metric,
                "best_epoch": best_epoch,
                "rng": rngs[0],
                "rng_ranks": rngs,
                "world_size": world,
            },
        )

    # fewer torch threads while other jobs hold cores; never under DDP, where the ranks are those jobs
    with AdaptiveThreads(ceiling=None if world == 1 else 1) as threads:
        while epoch < tc.epochs:
            train_ds.epoch = epoch
            torch.manual_seed(_mix(tc.seed, epoch, 1))  # dropout and other in-net randomness
            gen = torch.Generator().manual_seed(_mix(tc.seed, epoch, 2))
            order = shard(torch.randperm(len(train_ds), generator=gen).tolist(), rank, world)
            order = order[batch_in_epoch * tc.batch_size : batches_per_epoch * tc.batch_size]
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(train_ds, order),
                batch_size=tc.batch_size,
                shuffle=False,
                num_workers=tc.num_workers,
                collate_fn=task.collate,
            )
            net.train()
            t0, losses = time.time(), []
            for batch in loader:
                boundary = (batch_in_epoch + 1) % tc.accumulate == 0 or batch_in_epoch + 1 == batches_per_epoch
                # DDP exchanges gradients in backward: only at an accumulation boundary
                with net.no_sync() if world > 1 and not boundary else contextlib.nullcontext():
                    with _autocast(device, amp):
                        loss = task.loss(net, batch, device) / tc.accumulate
                    if not scaler.is_enabled():  # (fp16's scaler skips such steps itself)
                        _stop_if_nonfinite(loss, world, f"at epoch {epoch + 1}, batch {batch_in_epoch + 1}; lower "
                                                        f"train.lr (now {tc.lr:g}) or check the data")
                    scaler.scale(loss).backward()
                losses.append(float(loss.detach()) * tc.accumulate)
                batch_in_epoch += 1
                if boundary:
                    threads.tick()
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                    global_step += 1
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-tc.accumulate:]):.4f}")
                    if tc.checkpoint_every and global_step % tc.checkpoint_every == 0 and batch_in_epoch < batches_per_epoch:
                        save_resume_point()
            record = {"epoch": epoch + 1, "step": global_step, "loss": _mean_over_ranks(losses, device, world),
                      "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 3)}
            epoch, batch_in_epoch = epoch + 1, 0
            # the last step's update went bad (weights, or the running statistics of batch norm)
            if nonfinite_key(model.state_dict()) is not None:
                raise MedvitError(f"training diverged: the weights hold NaN or inf after epoch {epoch}; lower train.lr "
                                  f"(now {tc.lr:g}) or check the data")
            if epoch % tc.val_every == 0 or epoch == tc.epochs:
                failure = None
                if main:
                    try:
                        v = task.validate(model, device, amp)
                    except NonFiniteOutput as e:  # finite weights so large that the outputs overflow
                        failure = MedvitError(f"training diverged: after epoch {epoch} the net's outputs on validation "
                                              f"data are NaN or inf ({e}); lower train.lr (now {tc.lr:g}) or check the data")
                        v = None
                    if v is not None:
                        # no score (NaN: nothing to score) is logged as null, and never picks the best checkpoint
                        score = v["score"] if v["score"] is not None and math.isfinite(v["score"]) else None
                        record.update({f"val_{task.metric}": score, f"val_{task.per_label}": v["per_label"]})
                        if score is not None and (best_metric is None or score > best_metric):
                            best_metric, best_epoch = score, epoch
                            task.save(model, out / "best.safetensors", {"epoch": epoch, f"val_{task.metric}": best_metric})
                if world > 1:  # the others wait here for rank 0's verdict
                    verdict = [None if failure is None else str(failure), best_metric, best_epoch]
                    dist.broadcast_object_list(verdict, src=0)
                    if verdict[0] is not None and failure is None:
                        failure = MedvitError(verdict[0])
                    best_metric, best_epoch = verdict[1], verdict[2]
                if failure is not None:
                    raise failure
                net.train()
            if main:
                task.save(model, out / "last.safetensors", {"epoch": epoch, "global_step": global_step})
            save_resume_point()
            if main:
                log(record)
    bar.close()
    if world > 1:
        dist.barrier()  # every rank returns once rank 0's files are written
    return TrainResult(out, best_metric, best_epoch, epoch, global_step)


def _stop_if_nonfinite(loss: torch.Tensor, world: int, advice: str) -> None:
    """MedvitError on every rank when the loss is NaN or inf on any (one rank alone stopping would
    leave the others waiting at the next gradient exchange)."""
    bad = not bool(torch.isfinite(loss))
    anywhere = bad
    if world > 1:
        flag = torch.tensor([float(bad)], device=loss.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        anywhere = bool(flag.item())
    if anywhere:
        what = f"the loss is {float(loss.detach())}" if bad else "the loss is NaN or inf on another rank"
        raise MedvitError(f"training diverged: {what} {advice}")


def _mean_over_ranks(losses: list[float], device: torch.device, world: int) -> float | None:
    """The epoch's mean batch loss over every rank's batches (None without any)."""
    if world == 1:
        return float(np.mean(losses)) if losses else None
    t = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] else None
