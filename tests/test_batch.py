"""analyze on a real dask.distributed LocalCluster: the same tables as a serial run, a worker
killed mid-run, and an image that kills its workers."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

distributed = pytest.importorskip("distributed")

from emparticles.batch import (
    check_output_reachable,
    close_client,
    run_on_cluster,
    start_client,
    wait_for_workers,
)
from emparticles.errors import InputError
from emparticles.pipeline import AnalysisSettings, AnalyzeRun


def write_fields(folder: Path, count: int, size=(480, 640)) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[: size[0], : size[1]]
    paths = []
    for k in range(count):
        img = np.full(size, 40.0)
        for _ in range(60):
            cy, cx, r = rng.uniform(20, size[0] - 20), rng.uniform(20, size[1] - 20), rng.uniform(5, 12)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 190
        img = np.clip(img + rng.normal(0, 10, size), 0, 255).astype(np.uint8)
        paths.append(folder / f"field{k:02d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def serial_table(paths, out: Path, settings: AnalysisSettings) -> pd.DataFrame:
    from emparticles.models import load_model
    from emparticles.pipeline import analyse_path

    run = AnalyzeRun(out, settings)
    model = load_model(settings.model, "cpu")
    for p in paths:
        run.save_image(p.stem, analyse_path(p, model, settings))
    run.combine()
    return sorted_table(out)


def sorted_table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "all_particles.csv").sort_values(["image", "label"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def cluster():
    client, local = start_client(2, None)
    wait_for_workers(client, 2)
    yield client
    close_client(client, local)


SETTINGS = AnalysisSettings(model="classical", pixel_size_nm=2.0)


def _imported() -> list[str]:
    import sys

    return sorted(m for m in ("torch", "onnxruntime", "emparticles.pipeline", "emparticles.models.cnn") if m in sys.modules)


def test_local_workers_start_with_the_libraries_already_imported(cluster):
    # forked from a server that imported them once, before any image was sent (spawned workers
    # would import them at their first image, each on its own)
    assert list(cluster.run(_imported).values()) == [["emparticles.models.cnn", "emparticles.pipeline", "onnxruntime",
                                                      "torch"]] * 2


def test_cluster_gives_the_serial_tables_and_reuses_finished_images(tmp_path, cluster):
    paths = write_fields(tmp_path / "in", 6, size=(200, 260))
    reference = serial_table(paths, tmp_path / "serial", SETTINGS)
    run = AnalyzeRun(tmp_path / "par", SETTINGS)
    seen = []
    run_on_cluster(run, paths, [p.stem for p in paths], SETTINGS, cluster, lambda n, p, s: seen.append(s["status"]))
    run.combine()
    assert seen == ["ok"] * 6
    pd.testing.assert_frame_equal(sorted_table(tmp_path / "par"), reference)
    assert (reference["score"] == reference["score"].round(3)).all()  # no digits the threads decide
    assert list(pd.read_csv(tmp_path / "par" / "images.csv")["image"]) == [p.stem for p in paths]  # input order
    # a re-run reuses every finished image and runs nothing
    again = AnalyzeRun(tmp_path / "par", SETTINGS)
    run_on_cluster(again, paths, [p.stem for p in paths], SETTINGS, cluster)
    assert all(s.get("reused") for s in again.report.statuses.values())


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(tmp_path, cluster):
    paths = write_fields(tmp_path / "in", 8)
    reference = serial_table(paths, tmp_path / "serial", SETTINGS)
    killed = []

    def kill_a_busy_worker(name, path, status) -> None:
        if killed:
            return
        busy = [w for w, tasks in cluster.processing().items() if tasks]
        if busy:
            pid = cluster.run(os.getpid, workers=[busy[0]])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    run = AnalyzeRun(tmp_path / "par", SETTINGS)
    run_on_cluster(run, paths, [p.stem for p in paths], SETTINGS, cluster, kill_a_busy_worker)
    run.combine()
    assert killed, "no worker was busy to kill"
    assert [s["status"] for s in run.report.statuses.values()] == ["ok"] * 8
    pd.testing.assert_frame_equal(sorted_table(tmp_path / "par"), reference)
    assert (reference["score"] == reference["score"].round(3)).all()  # no digits the threads decide
    wait_for_workers(cluster, 2)  # the nanny restarts it


class _Poison(distributed.WorkerPlugin):
    """Makes every worker die (as from a crash in a library) on images whose name says poison."""

    def setup(self, worker):
        from emparticles import batch

        original = batch.analyse_on_worker
        if getattr(original, "poisoned", False):
            return

        def poisoned(path, *args, **kwargs):
            if "poison" in Path(path).name:
                os._exit(1)
            return original(path, *args, **kwargs)

        poisoned.poisoned = True
        batch.analyse_on_worker = poisoned


def test_an_image_that_kills_workers_twice_is_failed_and_the_batch_goes_on(tmp_path):
    paths = write_fields(tmp_path / "in", 3, size=(200, 260))
    poison = paths[1].with_name("poison.png")
    paths[1].rename(poison)
    paths[1] = poison
    client, local = start_client(2, None)
    try:
        wait_for_workers(client, 2)
        client.register_plugin(_Poison())
        run = AnalyzeRun(tmp_path / "par", SETTINGS)
        run_on_cluster(run, paths, [p.stem for p in paths], SETTINGS, client)
        run.combine()
    finally:
        close_client(client, local)
    st = run.report.statuses
    assert st["poison"]["status"] == "failed" and "died 2 times" in st["poison"]["message"]
    assert st["field00"]["status"] == st["field02"]["status"] == "ok"
    images = pd.read_csv(tmp_path / "par" / "images.csv")
    assert list(images["status"]) == ["ok", "failed", "ok"]


def test_an_output_folder_the_workers_cannot_see_is_refused(tmp_path, cluster, monkeypatch):
    from emparticles import batch

    folder = tmp_path / "out"
    check_output_reachable(cluster, folder)  # a local cluster shares the folder
    assert not list((folder / ".workers").glob("worker-*"))  # the probes are cleaned up
    # workers on another machine find another folder of that name: no token of the client's there
    monkeypatch.setattr(batch, "_probe", lambda out_dir, token: "")
    paths = write_fields(tmp_path / "in", 1, size=(100, 120))
    run = AnalyzeRun(folder, SETTINGS)
    with pytest.raises(InputError, match="cannot reach this output folder"):
        run_on_cluster(run, paths, [p.stem for p in paths], SETTINGS, cluster)
    assert not list((folder / ".parts").glob("*.json"))  # refused before any image was sent


def test_the_probe_fails_when_the_token_differs(tmp_path):
    from emparticles.batch import _probe

    (tmp_path / ".workers").mkdir()
    (tmp_path / ".workers" / "client").write_text("abc")
    assert _probe(str(tmp_path), "xyz") == ""  # another machine's folder of the same name
    assert Path(_probe(str(tmp_path), "abc")).exists()


def test_runs_opened_at_once_on_one_folder_do_not_trip_over_each_other(tmp_path):
    # as cluster workers do when their first images start together: each checks that the folder
    # can be written without removing another's check
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(lambda _: AnalyzeRun(tmp_path / "out", SETTINGS), range(400)))
    assert len(runs) == 400 and not list((tmp_path / "out").glob(".write-test*"))
