"""Many images on a dask.distributed cluster: a local one (``--workers N``) or an existing one
(``--scheduler tcp://HOST:PORT``).

The per-image outputs of :class:`~emparticles.pipeline.AnalyzeRun` stay the source of truth:
the worker that analyses an image writes its labels, overlay, ROIs and part tables atomically
into the output folder, and its ``.parts/NAME.json`` last, which marks it finished. The client
only schedules images, records what each worker reports and combines the tables from the parts,
as a serial run does. So:

- a worker killed mid-image leaves at most that image unfinished; the scheduler runs it again on
  another worker, whose files replace the partial ones (same names, written atomically), and
  nothing is counted twice, since the combined tables are built from one part per image;
- an image that kills workers twice (``distributed.scheduler.allowed-failures`` = 1) is recorded
  as failed with the reason, and the batch goes on;
- a re-run skips finished images, whether a worker or a serial run made them.

Each worker loads the model once (:func:`_worker_model`), with torch using the worker's threads
(workers x threads = cores for a local cluster: two processes each running two torch threads on
two cores are ten times slower than one thread each).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # imported where used: start_worker_server runs before the pipeline's imports
    from .pipeline import AnalysisSettings, AnalyzeRun

#: How often the scheduler retries an image whose worker died, before calling it failed: the
#: first death may be bad luck (a node pre-empted), the second says the image itself kills workers.
ALLOWED_FAILURES = 1

_MODELS: dict[tuple[str, str], object] = {}
_MODELS_LOCK = threading.Lock()


def _worker_threads() -> int:
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return 1


def limit_threads(n: int) -> None:
    """Every thread pool of this process at ``n`` threads: torch, OpenCV, numba and the BLAS
    libraries (each would otherwise start one thread per core in every worker, and two workers
    on two cores ran 1.6 times slower than one process)."""
    import cv2
    import torch

    torch.set_num_threads(n)
    cv2.setNumThreads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:
        pass


def _worker_model(model: str, device: str):
    """The segmenter of this worker process, loaded on first use and kept for the next images."""
    with _MODELS_LOCK:
        key = (model, device)
        if key not in _MODELS:
            limit_threads(_worker_threads())
            from .models.registry import load_model

            _MODELS[key] = load_model(model, device)
        return _MODELS[key]


def analyse_on_worker(path: str, name: str, out_dir: str, settings: dict, model_location: str) -> dict:
    """Analyse one image on a worker and write its outputs into ``out_dir`` (as
    :meth:`AnalyzeRun.save_image` does in a serial run). ``model_location``: the model's name,
    or its folder as an absolute path. Returns ``{"status", "message", "warnings"}``; a failure
    of the image itself is recorded as failed, never raised."""
    from .pipeline import AnalysisSettings, AnalyzeRun, analyse_path, error_message

    cfg = AnalysisSettings(**settings)
    run = AnalyzeRun(Path(out_dir), cfg)
    try:
        result = analyse_path(Path(path), _worker_model(model_location, cfg.device), cfg)
        run.save_image(name, result)
    except Exception as exc:  # noqa: BLE001 - one bad file never stops a batch
        message = error_message(exc)
        run.save_failure(name, Path(path), message, getattr(exc, "known", None))
        return {"status": "failed", "message": message, "warnings": []}
    return {k: run.report.statuses[name][k] for k in ("status", "message", "warnings")}


def _probe(out_dir: str, token: str) -> str:
    """Run on every worker: can it read the client's token in ``out_dir`` and write its own?"""
    folder = Path(out_dir) / ".workers"
    try:
        seen = (folder / "client").read_text() == token
        mine = folder / f"worker-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        mine.write_text(token)
        return str(mine) if seen else ""
    except OSError:
        return ""


def check_output_reachable(client, out_dir: Path) -> None:
    """Every worker must see the same output folder as the client: a token written here must be
    readable there, and theirs here. Raises :class:`InputError` naming the folder otherwise."""
    folder = Path(out_dir) / ".workers"
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    (folder / "client").write_text(token)
    answers = client.run(_probe, str(Path(out_dir).resolve()), token)
    bad = [w for w, written in answers.items() if not written or not Path(written).exists()]
    for written in answers.values():
        if written and Path(written).exists():
            Path(written).unlink()
    if bad:
        raise InputError(out_dir, f"{len(bad)} of {len(answers)} workers cannot reach this output folder "
                                  f"(e.g. {bad[0]})",
                         "give -o a folder on storage every worker mounts at the same path (a shared file "
                         "system), or run without --scheduler")


#: What a local cluster's worker processes import once, in the process they are forked from
WORKER_PRELOAD = ("distributed", "numpy", "pandas", "scipy.ndimage", "skimage.measure", "cv2", "torch",
                  "onnxruntime", "emparticles.batch", "emparticles.pipeline", "emparticles.models.registry", "emparticles.cli",
                  "emparticles.models.cnn", "emparticles.io.scalebar", "rapidocr")


def fork_workers_from_one_import() -> None:
    """Start a local cluster's processes by forking them from a server process that has imported
    the analysis's libraries once (multiprocessing's ``forkserver``), instead of starting each
    one fresh (``spawn``, dask's default) to import them again: on two cores every worker spent
    about 8 s importing torch, OpenCV and the rest before its first image, the two competing for
    the cores. The server imports nothing that starts threads (no model is loaded in it), so the
    fork is safe; each worker loads its model itself (:func:`_worker_model`)."""
    import dask

    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    start_worker_server()


def start_worker_server() -> None:
    """Start the server process that local workers are forked from, now: it imports
    :data:`WORKER_PRELOAD` in the background (about 4 s on one core) while this process goes on
    with its own start. Calling it again does nothing while the server runs."""
    import multiprocessing
    import multiprocessing.forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_PRELOAD))
    multiprocessing.forkserver.ensure_running()


def start_client(workers: int | None, scheduler: str | None):
    """A dask.distributed client: of the cluster at ``scheduler``, or of a new local cluster of
    ``workers`` processes sharing the machine's cores. Returns (client, cluster or None)."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError(None, "--workers and --scheduler need dask.distributed",
                         'pip install "emparticles[cluster]"') from None
    dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES})
    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as exc:
            raise InputError(None, f"no dask scheduler answers at {scheduler} ({exc})",
                             "check the address (tcp://HOST:8786) and that the scheduler runs") from None
    fork_workers_from_one_import()
    cores = os.cpu_count() or 1
    n = max(1, int(workers or 1))
    threads = max(1, cores // n)
    # each worker's libraries start with their share of the cores, not all of them
    env = {k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                     "NUMBA_NUM_THREADS")}
    cluster = LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, dashboard_address=":0",
                           silence_logs=40, env=env)
    return Client(cluster), cluster


def run_on_cluster(run: AnalyzeRun, files: list[Path], names: list[str], settings: AnalysisSettings,
                   client, on_done: Callable[[str, Path, dict], None] | None = None) -> None:
    """Analyse the images of ``files`` not yet finished in ``run`` on ``client``'s workers, one
    task per image, recording each outcome in ``run`` as it arrives (and combining the tables
    when due). ``on_done(name, path, status)`` is called for every image, reused ones included.
    Ctrl-C cancels what is still queued; the finished images are kept."""
    from distributed import as_completed
    from distributed.client import FutureCancelledError

    check_output_reachable(client, run.out)
    out_dir = str(run.out.resolve())
    model_location = str(Path(settings.model).resolve()) if Path(settings.model).is_dir() else settings.model
    pending = {}
    for path, name in zip(files, names):
        if run.is_done(name):
            run.record_done(name, path)
            if on_done:
                on_done(name, path, run.report.statuses[name])
            continue
        future = client.submit(analyse_on_worker, str(Path(path).resolve()), name, out_dir, asdict(settings),
                               model_location, key=f"emparticles-{name}-{uuid.uuid4().hex[:8]}", pure=False)
        pending[future] = (name, path)
    try:
        for future in as_completed(list(pending)):
            name, path = pending.pop(future)
            try:
                status = future.result()
            except FutureCancelledError:
                continue
            except Exception as exc:  # noqa: BLE001 - KilledWorker and any other scheduler failure
                message = (f"the worker analysing it died {ALLOWED_FAILURES + 1} times (out of memory, or a "
                           f"crash in a library); {type(exc).__name__}. Fix: check the image, or give the "
                           "workers more memory" if type(exc).__name__ == "KilledWorker"
                           else f"unexpected {type(exc).__name__}: {exc}")
                run.save_failure(name, path, message)
                status = run.report.statuses[name]
            else:
                run.record_result(name, path, status)
            if on_done:
                on_done(name, path, status)
            run.combine_if_due()
    except KeyboardInterrupt:
        client.cancel(list(pending))
        raise
    finally:
        run.keep_order(names)


def close_client(client, cluster) -> None:
    """Close the client and the local cluster it started, if any, without waiting long."""
    try:
        client.close(timeout=10)
    finally:
        if cluster is not None:
            cluster.close(timeout=10)


def wait_for_workers(client, n: int, timeout_s: float = 60.0) -> None:
    """Wait until ``n`` workers are connected (a fresh local cluster starts them in the background)."""
    deadline = time.monotonic() + timeout_s
    while len(client.scheduler_info()["workers"]) < n and time.monotonic() < deadline:
        time.sleep(0.1)
