"""``medvit batch``: segment a cohort on Ray, one model per worker, resumable after a crash.

The driver lists the cases (:mod:`pipelines.volume.cohort`), skips those whose ``done`` record and
outputs agree with this run, and feeds the rest to ``--workers`` Ray actors (:class:`CaseWorker`),
each of which loads the checkpoint once and runs :func:`pipelines.volume.segment.segment_case` per case
into ``OUT/.<id>.tmp-XXXX``, writes ``done.json`` there last and renames the folder to
``OUT/<id>``. A case's error becomes its row in the cohort table; the other cases go on.

Nothing the batch prints, logs or writes names a source path: messages, warnings and the label
map's sidecar from a case have its source path(s) replaced by its id (:func:`redact`);
``cases.csv`` is the one file that maps ids to paths.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from medvit.core.errors import InputError, MedvitError

from pipelines.volume.cohort import CASES, DONE, Case, finished, list_cases, output_hashes, remove_stale, sources_digest, \
    table_rows, write_cases, write_table

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
"""How long ``--address`` may take to accept a TCP connection before the batch gives up."""
FAILED_BASE = 10
"""Exit status with failed cases: FAILED_BASE + their count, at most FAILED_BASE + 99."""
SEGMENT_OPTIONS = ("overlap", "batch_size", "runtime", "series", "nonfinite", "resample", "skip_below_hu", "tta", "strict", "tilt",
                   "dicom_seg", "seg_type", "rtstruct", "stats", "preview")
"""The options recorded in each done record; a rerun with other values redoes the case."""


def exit_status(failed: int) -> int:
    """0 when every case is done; else :data:`FAILED_BASE` + the number failed (capped at 99 of them),
    apart from 2, a user error of the whole command."""
    return 0 if failed == 0 else FAILED_BASE + min(failed, 99)


def import_ray():
    try:
        import ray
    except ImportError:
        raise MedvitError("medvit batch runs on Ray, which is not installed: pip install 'medvit[cohort]'") from None
    return ray


def probe_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """MedvitError unless ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts a TCP connection within ``timeout``."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise MedvitError(f"--address {address}: expected HOST:PORT, e.g. 10.0.0.5:6379 (the head node's GCS port)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        why = "no answer" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise MedvitError(f"--address {address}: no Ray cluster reachable there ({why} within {timeout:g} s); "
                          "start one with 'ray start --head' or leave --address out for a local one") from None


def redact(text: str, case: Case) -> str:
    """``text`` with each source path of ``case`` (as given, resolved) replaced by the case id."""
    forms = set()
    for p in case.paths:
        forms |= {p, str(Path(p)), os.path.abspath(p), str(Path(p).resolve())}
    for f in sorted(forms, key=len, reverse=True):
        text = text.replace(f, case.case_id)
    return text


def _redact_doc(doc, case: Case):
    if isinstance(doc, str):
        return redact(doc, case)
    if isinstance(doc, list):
        return [_redact_doc(v, case) for v in doc]
    if isinstance(doc, dict):
        return {k: _redact_doc(v, case) for k, v in doc.items()}
    return doc


class _Held(logging.Handler):
    """Collects a case's warnings (log records and Python warnings) instead of printing them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


ENGINE_OPTIONS = ("overlap", "batch_size", "skip_below_hu", "tta", "runtime")
"""The options of :data:`SEGMENT_OPTIONS` that make the engine's settings (:func:`~pipelines.volume.segment.volume_settings`)."""


def run_case(model, case: Case, out: Path, options: dict, expect: dict, checkpoint: dict, engine) -> dict:
    """Segment ``case`` into ``OUT/.<id>.tmp-XXXX``, write its done record, rename it to ``OUT/<id>``.

    ``engine`` (a :class:`~pipelines.engine.Engine`) runs the net; its settings come from
    :data:`ENGINE_OPTIONS`, the rest of ``options`` go to ``segment_case``.

    Returns ``{"case_id", "status": "ok", "record", "warnings", "seconds"}`` or, for any error,
    ``{"case_id", "status": "error", "message"}`` with nothing of the case left in ``out``.
    Messages name the case id, not its sources.
    """
    from pipelines.volume.segment import check_case, segment_case

    start = time.perf_counter()
    tmp = out / f".{case.case_id}.tmp-{secrets.token_hex(4)}"
    held, root = _Held(), logging.getLogger()
    root.addHandler(held)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tmp.mkdir(parents=True)
            kw = {k: options[k] for k in SEGMENT_OPTIONS if k not in ("stats", *ENGINE_OPTIONS)}
            check_case(list(case.paths), model, **kw)
            result = segment_case(list(case.paths), model, tmp, name=case.case_id, engine=engine,
                                  stats=True, progress=False, checkpoint=checkpoint, **kw)
        notes = [redact(m, case) for m in held.messages + [str(w.message) for w in caught]]
        stats_csv, stats_json = result.stats_paths
        labels = json.loads(stats_json.read_text())
        if not options["stats"]:  # the cohort table holds them; per-case files only when asked
            stats_csv.unlink()
            stats_json.unlink()
        sidecar = json.loads(result.sidecar_path.read_text())
        sidecar["source"] = {"case_id": case.case_id,
                             **{k: v for k, v in sidecar["source"].items() if k != "paths"}}
        sidecar["outputs"] = [n for n in sidecar["outputs"] if (tmp / n).is_file()]
        sidecar["options"]["stats"] = options["stats"]
        result.sidecar_path.write_text(json.dumps(_redact_doc(sidecar, case), indent=1) + "\n")
        record = {**expect, "case_id": case.case_id, "outputs": output_hashes(tmp), "labels": labels,
                  "warnings": notes}
        with open(tmp / DONE, "w") as f:  # last: its presence says every output before it is whole
            f.write(json.dumps(record, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        final = out / case.case_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return {"case_id": case.case_id, "status": "ok", "record": record, "warnings": notes,
                "seconds": time.perf_counter() - start}
    except Exception as e:  # noqa: BLE001 - one case's failure is its row; the cohort goes on
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, MedvitError):
            return {"case_id": case.case_id, "status": "error", "message": redact(" ".join(str(e).split()), case)}
        message = f"{type(e).__name__}: {e} (a medvit bug; please report it with the traceback printed)"
        return {"case_id": case.case_id, "status": "error", "message": redact(" ".join(message.split()), case),
                "traceback": redact(traceback.format_exc(), case)}
    finally:
        root.removeHandler(held)


class CaseWorker:
    """A Ray actor: the checkpoint loaded once, then :func:`run_case` per case, all through one
    engine, so what out-of-memory errors taught it, and a net converted for ``--runtime``, carry
    over from case to case. The converted runtime runs on ``threads`` threads, as torch does;
    ``runtime_cache`` is its cache root (None: the worker's default)."""

    def __init__(self, checkpoint: str, config: str | None, device: str, threads: int,
                 runtime_cache: str | None = None):
        import torch

        from medvit.checkpoint import load_checkpoint
        from medvit.config import load_config
        from pipelines.volume.segment import checkpoint_record

        torch.set_num_threads(threads)
        start = time.perf_counter()
        self.model = load_checkpoint(checkpoint, config=load_config(config) if config else None, device=device)
        self.checkpoint = checkpoint_record(self.model)
        self.load_seconds = time.perf_counter() - start
        self.device = device
        self.threads = threads
        self.runtime_cache = runtime_cache
        self.engine = None

    def load_time(self) -> float:
        return self.load_seconds

    def run(self, case: Case, out: str, options: dict, expect: dict) -> dict:
        from pipelines.engine import Engine
        from pipelines.volume.segment import volume_settings

        settings = volume_settings(self.model.config, device=self.device, **{k: options[k] for k in ENGINE_OPTIONS})
        self.engine = Engine(settings, runtime_threads=self.threads, runtime_cache=self.runtime_cache) \
            if self.engine is None else self.engine.with_settings(settings)
        return run_case(self.model, case, Path(out), options, expect, self.checkpoint, self.engine)


@dataclass
class BatchResult:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """case id -> its one-line error."""
    tables: tuple[Path, Path] | None = None
    cases_csv: Path | None = None
    load_seconds: list[float] = field(default_factory=list)
    """Each worker's checkpoint load time."""
    seconds: float = 0.0


def run_batch(source: str | Path, out: str | Path, checkpoint: str | Path, *, config: str | Path | None = None,
              root: str | Path | None = None, split: str | None = None, workers: int = 1, address: str | None = None,
              threads: int | None = None, device: str = "cpu", progress: bool = True, **options) -> BatchResult:
    """Segment every case of ``source`` (see :func:`pipelines.volume.cohort.list_cases`) into ``out``.

    ``options`` are :data:`SEGMENT_OPTIONS` (as :func:`pipelines.volume.segment.segment_case` takes them).
    ``address`` joins a running Ray cluster (probed first: MedvitError within
    :data:`PROBE_TIMEOUT_S`); without it a local Ray instance of ``workers`` × ``threads`` CPUs runs
    and is shut down at the end (a Ray session this process already holds is used as is).
    ``threads``: torch threads per worker, default the CPUs divided among the workers.
    User errors of the whole run (a bad checkpoint, source, output folder or address) raise
    MedvitError before any case runs.
    """
    from medvit.checkpoint import load_checkpoint
    from medvit.config import load_config
    from medvit.core.files import check_writable, make_output_folder
    from pipelines.volume.segment import checkpoint_record

    start = time.perf_counter()
    if workers < 1:
        raise MedvitError(f"--workers must be at least 1, got {workers}")
    if address is not None:
        probe_address(address)
    ray = import_ray()
    cases = list_cases(source, root=root, split=split)
    out = Path(out)
    src = Path(source).resolve()
    if src.is_dir() and (out.resolve() == src or src in out.resolve().parents):
        raise InputError(out, f"the output folder lies inside the folder of cases {source}; its case folders "
                              "would be read as cases. Choose another output folder")
    model = load_checkpoint(checkpoint, config=load_config(config) if config else None, device="cpu")
    options = {k: options.get(k) for k in SEGMENT_OPTIONS}
    expect = {"checkpoint_sha256": checkpoint_record(model)["sha256"], "options": options}
    del model
    make_output_folder(out)
    check_writable(out / CASES)
    remove_stale(out)
    write_cases(cases, out / CASES)

    result = BatchResult(cases_csv=out / CASES)
    records: dict[str, dict] = {}
    todo = []
    for c in cases:
        rec = finished(out / c.case_id, {**expect, "sources_sha256": sources_digest(c)})
        if rec is not None:
            records[c.case_id] = rec
            result.skipped.append(c.case_id)
        else:
            todo.append(c)
    if todo:
        _run_on_ray(ray, todo, out, options, expect, result, records, checkpoint=str(Path(checkpoint).resolve()),
                    config=str(Path(config).resolve()) if config else None, workers=workers, address=address,
                    threads=threads, device=device, progress=progress)
    rows = [r for c in cases for r in table_rows(c.case_id, records.get(c.case_id), result.failed.get(c.case_id))]
    result.tables = write_table(rows, out)
    result.seconds = time.perf_counter() - start
    return result


def _run_on_ray(ray, todo: list[Case], out: Path, options: dict, expect: dict, result: BatchResult,
                records: dict, *, checkpoint: str, config: str | None, workers: int, address: str | None,
                threads: int | None, device: str, progress: bool) -> None:
    from tqdm import tqdm

    workers = min(workers, len(todo))
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    owned = not ray.is_initialized()
    if owned:
        kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        if address is None:
            ray.init(address="local", num_cpus=workers * threads, object_store_memory=100 << 20, **kw)
        else:
            try:
                ray.init(address=address, **kw)
            except Exception as e:  # noqa: BLE001 - something answers there, but not a Ray cluster we can join
                first = (str(e).strip().splitlines() or [""])[0]
                raise MedvitError(f"--address {address}: could not join a Ray cluster there ({type(e).__name__}: "
                                  f"{first})") from None
    gpu = 1 if device.startswith("cuda") else 0
    actor = ray.remote(num_cpus=threads, num_gpus=gpu, max_restarts=0)(CaseWorker)

    # a cache folder the user named reaches the workers; else each uses its own default
    cache = None
    if os.environ.get("MEDVIT_CACHE"):
        from medvit.runtimes import default_cache_dir

        cache = str(default_cache_dir())

    def start():
        return actor.remote(checkpoint, config, device, threads, cache)

    pool = [start() for _ in range(workers)]
    pending: dict = {}
    queue = list(reversed(todo))
    bar = None
    try:
        loads = [w.load_time.remote() for w in pool]  # before any case: an actor runs its calls in order
        for w in pool:
            if queue:
                c = queue.pop()
                pending[w.run.remote(c, str(out), options, {**expect, "sources_sha256": sources_digest(c)})] = (w, c)
        try:
            result.load_seconds = ray.get(loads)
        except ray.exceptions.RayActorError as e:  # say, the checkpoint's path is not on a cluster node
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
            raise MedvitError(f"{checkpoint}: a Ray worker could not load it ({last[0].strip()})") from None
        bar = tqdm(total=len(todo), desc="cases", unit="case", disable=not progress, dynamic_ncols=True)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            w, c = pending.pop(ready[0])
            try:
                res = ray.get(ready[0])
            except ray.exceptions.RayActorError:  # the worker died (out of memory, killed): the case fails
                res = {"case_id": c.case_id, "status": "error", "message": "its worker process died (out of memory?)"}
                ray.kill(w)
                pool[pool.index(w)] = w = start()
            if res["status"] == "ok":
                records[c.case_id] = res["record"]
                result.done.append(c.case_id)
                for m in res["warnings"]:
                    log.warning("%s", m if m.startswith(c.case_id) else f"{c.case_id}: {m}")
            else:
                result.failed[c.case_id] = res["message"]
                if "traceback" in res:  # our bug: its traceback, as any other command would show it
                    log.error("case %s:\n%s", c.case_id, res["traceback"].rstrip())
            bar.update(1)
            if queue:
                c = queue.pop()
                pending[w.run.remote(c, str(out), options, {**expect, "sources_sha256": sources_digest(c)})] = (w, c)
    finally:
        if bar is not None:
            bar.close()
        for w in pool:
            ray.kill(w)
        if owned:
            ray.shutdown()
