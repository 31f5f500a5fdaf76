"""Report, summary, exports (ROI zip, COCO, Parquet) and sample comparison, end to end."""

import json

import numpy as np
import pandas as pd
import pytest
import roifile
import tifffile
from pycocotools import mask as mask_utils
from scipy import ndimage as ndi
from skimage.draw import polygon2mask
from typer.testing import CliRunner

from emparticles.cli import app
from emparticles.report.build import SECTIONS

from .conftest import disks_image

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def two_image_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(5)
    for k in range(2):
        centres = [(rng.uniform(0, 200), rng.uniform(0, 260)) for _ in range(40)]  # some cut by the border
        img, _ = disks_image(centres, radius=int(5 + 2 * k), shape=(200, 260), seed=k)
        tifffile.imwrite(tmp / f"img{k}.tif", img, imagej=True, resolution=(1 / 1.5, 1 / 1.5), metadata={"unit": "nm"})
    out = tmp / "out"
    r = run("analyze", tmp / "img0.tif", tmp / "img1.tif", "-o", out, "--edge-particles", "miles-lantuejoul",
            "--model", "classical")
    assert r.exit_code == 0, r.output
    return out


def test_report_has_every_section(two_image_run):
    html = (two_image_run / "report.html").read_text()
    for section in SECTIONS:
        assert f"id='{section}'" in html, section
    assert "img0" in html and "img1" in html and "tiff:ImageJ" in html
    assert "data:image/png;base64," in html and "http" not in html.split("</style>")[1]  # works offline
    svg = (two_image_run / "plots" / "ecd_histogram.svg").read_text()
    assert "<text" in svg and "D50" in svg  # labels stay text, editable in a vector editor


def test_summary_json(two_image_run):
    s = json.loads((two_image_run / "summary.json").read_text())
    assert s["unit"] == "nm" and s["edge_particles"] == "miles-lantuejoul"
    d50 = s["pooled"]["d50"]
    assert d50["low"] <= d50["value"] <= d50["high"]
    assert {row["image"] for row in s["per_image"]} == {"img0", "img1"}
    assert all(row["nnd_classification"] in ("random", "self-avoiding", "clustered") for row in s["spatial"])
    parts = pd.read_csv(two_image_run / "particles.csv")
    assert (parts.edge_weight >= 1).all() and not parts.touches_edge.any()
    everything = pd.read_csv(two_image_run / "all_particles.csv")
    assert everything.touches_edge.any() and (everything.included == ~everything.touches_edge).all()


def test_roi_zip_round_trip(two_image_run):
    labels = tifffile.imread(two_image_run / "labels" / "img0.tif").astype(np.int32)
    rois = roifile.roiread(two_image_run / "rois" / "img0.zip")
    assert len(rois) == labels.max()
    for roi in rois:
        xy = roi.coordinates()  # pixel-corner vertices; fill by pixel centres
        filled = polygon2mask(labels.shape, np.column_stack([xy[:, 1] - 0.5, xy[:, 0] - 0.5]))
        assert np.array_equal(filled, ndi.binary_fill_holes(labels == int(roi.name)))


def test_coco_and_parquet(two_image_run):
    coco = json.loads((two_image_run / "coco_instances.json").read_text())
    labels = tifffile.imread(two_image_run / "labels" / "img1.tif").astype(np.int32)
    image_id = next(im["id"] for im in coco["images"] if im["file_name"] == "img1")
    anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
    assert len(anns) == labels.max()
    for a in anns[:10]:
        m = mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
        assert np.array_equal(m.astype(bool), labels == a["particle_label"])
        assert 0 <= a["score"] <= 1
    pq = pd.read_parquet(two_image_run / "particles.parquet")
    csv = pd.read_csv(two_image_run / "particles.csv")
    assert len(pq) == len(csv) and np.allclose(pq.area_px, csv.area_px)


def test_report_command_rebuilds(two_image_run):
    (two_image_run / "report.html").unlink()
    r = run("report", two_image_run)
    assert r.exit_code == 0 and (two_image_run / "report.html").exists()


def _fake_run(path, sizes, pixel_size=1.0):
    path.mkdir()
    pd.DataFrame({"image": ["a"] * len(sizes), "ecd_px": sizes / pixel_size, "ecd_nm": sizes}).to_csv(path / "particles.csv", index=False)


def test_compare_shifted_and_identical(tmp_path):
    rng = np.random.default_rng(11)
    _fake_run(tmp_path / "day0", rng.lognormal(np.log(20), 0.3, 400))
    _fake_run(tmp_path / "day7", rng.lognormal(np.log(23), 0.3, 400))
    _fake_run(tmp_path / "day0_again", rng.lognormal(np.log(20), 0.3, 400))
    r = run("compare", tmp_path / "day0", tmp_path / "day7", "-o", tmp_path / "cmp")
    assert r.exit_code == 0, r.output
    row = pd.read_csv(tmp_path / "cmp" / "compare.csv").iloc[0]
    assert bool(row.significant) and 0 < row.d50_shift_low < 3.0 < row.d50_shift_high
    assert "significant" in r.output and (tmp_path / "cmp" / "d50.png").exists()
    r = run("compare", tmp_path / "day0", tmp_path / "day0_again", "-o", tmp_path / "cmp2")
    row = pd.read_csv(tmp_path / "cmp2" / "compare.csv").iloc[0]
    assert not bool(row.significant) and row.d50_shift_low < 0 < row.d50_shift_high


def test_compare_groups_with_times(tmp_path):
    rng = np.random.default_rng(2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sizes = np.concatenate([rng.lognormal(np.log(m), 0.25, 200) for m in (10, 12, 15)])
    images = np.repeat(["i0", "i1", "i2"], 200)
    pd.DataFrame({"image": images, "ecd_nm": sizes, "ecd_px": sizes}).to_csv(run_dir / "particles.csv", index=False)
    pd.DataFrame({"image": ["i0", "i1", "i2"], "group": ["t0", "t1", "t2"], "time": [0, 24, 48]}).to_csv(tmp_path / "g.csv", index=False)
    r = run("compare", run_dir, "--group-by", tmp_path / "g.csv", "-o", tmp_path / "cmp")
    assert r.exit_code == 0, r.output
    samples = pd.read_csv(tmp_path / "cmp" / "samples.csv")
    assert list(samples["sample"]) == ["t0", "t1", "t2"] and samples.d50.is_monotonic_increasing
    r = run("compare", run_dir, "-o", tmp_path / "c3")
    assert r.exit_code == 2 and "only one sample" in r.output


def test_report_for_another_measure_and_bins(two_image_run):
    r = run("report", two_image_run, "--measure", "feret_max", "--bins", "12", "--log-bins")
    assert r.exit_code == 0, r.output
    s = json.loads((two_image_run / "summary.json").read_text())
    assert s["size_measure"] == "feret_max" and s["histogram_bins"] == "12" and s["log_bins"]
    assert (two_image_run / "plots" / "feret_max_histogram.png").exists()
    assert run("report", two_image_run, "--measure", "volume").exit_code == 2
    assert run("report", two_image_run).exit_code == 0  # back to ECD for the other tests


def test_coco_runs_match_pycocotools_per_particle():
    from emparticles.io.exports import coco_instances

    lab = np.zeros((9, 7), np.int32)
    lab[0, 0] = 4  # first pixel in column order
    lab[-1, -1] = 9  # last pixel
    lab[2:6, 1:4] = 2  # runs in three columns with gaps between them
    lab[3, 5] = 2  # a second piece of the same label
    lab[6:9, 2] = 7
    coco = coco_instances({"a": lab}, {"a": np.linspace(0, 1, 9)})
    anns = {a["particle_label"]: a for a in coco["annotations"]}
    assert sorted(anns) == [2, 4, 7, 9]
    for label, a in anns.items():
        ref = mask_utils.encode(np.asfortranarray((lab == label).astype(np.uint8)))
        assert a["segmentation"]["counts"] == ref["counts"].decode()
        assert a["area"] == (lab == label).sum() and a["bbox"] == mask_utils.toBbox(ref).tolist()
        assert a["score"] == pytest.approx(np.linspace(0, 1, 9)[label - 1])
    empty = coco_instances({"b": np.zeros((4, 4), np.int32)})
    assert empty["annotations"] == [] and empty["images"][0]["width"] == 4
    # images given one at a time (as a run reads its 16-bit label files) give the same export
    pairs = iter([("a", lab.astype(np.uint16)), ("b", np.zeros((4, 4), np.uint16))])
    assert coco_instances(pairs, {"a": np.linspace(0, 1, 9)}) == coco_instances(
        {"a": lab, "b": np.zeros((4, 4), np.int32)}, {"a": np.linspace(0, 1, 9)})


def test_two_image_report_has_no_horizontal_scroll_at_1400_px_in_chromium(tmp_path):
    """The report is read in a browser by people who did not run the command: at 1400 px nothing
    may run off the page (the spatial table hid its conclusions there)."""
    import re
    import shutil
    import subprocess

    from PIL import Image
    from typer.testing import CliRunner

    from emparticles.cli import app

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium (.ci/run installs it)")
    rng = np.random.default_rng(0)
    for k in range(2):
        img = np.full((200, 260), 40, np.uint8)
        yy, xx = np.mgrid[:200, :260]
        for _ in range(30):
            cy, cx = rng.uniform(10, 190), rng.uniform(10, 250)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = 200
        Image.fromarray(img).save(tmp_path / f"field_with_a_long_file_name_{k}.png")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["analyze", str(tmp_path), "-o", str(out), "--model", "classical",
                                   "--pixel-size", "2nm", "--scale-bar", "off"])
    assert res.exit_code == 0, res.output
    page = (out / "report.html").read_text(encoding="utf-8")
    probe = ("<script>document.title='W'+document.documentElement.scrollWidth+':'"
             "+document.documentElement.clientWidth;</script></body>")
    (out / "probe.html").write_text(page.replace("</body>", probe), encoding="utf-8")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                          "--dump-dom", (out / "probe.html").as_uri()], capture_output=True, text=True, timeout=120,
                         check=False).stdout
    scroll, client = map(int, re.search(r"<title>W(\d+):(\d+)</title>", dom).groups())
    assert scroll <= client, f"the page is {scroll} px wide in a {client} px window"
    assert ">null<" not in page and ">nnd_f_statistic<" not in page  # settings and headings in words


def test_a_run_without_one_analysed_image_gets_exports_but_no_report(tmp_path):
    from emparticles.pipeline import AnalysisSettings, AnalyzeRun

    run = AnalyzeRun(tmp_path / "out", AnalysisSettings())
    run.save_failure("broken", tmp_path / "broken.png", "unreadable")
    run.finish(report=True)
    assert json.loads((tmp_path / "out" / "coco_instances.json").read_text())["images"] == []
    assert not (tmp_path / "out" / "report.html").exists()
