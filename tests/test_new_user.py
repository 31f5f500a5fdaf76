"""What a new user trips over, each fixed at its root."""

from __future__ import annotations

import os
import stat

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from emparticles.cli import app

runner = CliRunner()


def disks(path, shape=(120, 160)):
    from PIL import Image

    img = np.full(shape, 40, np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for cy, cx in ((30, 30), (60, 90), (90, 40)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 100] = 200
    Image.fromarray(img).save(path)
    return path


def test_outputs_keep_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        res = runner.invoke(app, ["analyze", str(disks(tmp_path / "a.png")), "-o", str(tmp_path / "out"),
                                  "--model", "classical", "--pixel-size", "2nm"])
        assert res.exit_code == 0, res.output
        from emparticles.models.cnn import save_model_folder
        from emparticles.models.networks import build_network

        save_model_folder(build_network("strided-unet-lite", 3), tmp_path / "model", {"arch": "strided-unet-lite"})
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()] + list((tmp_path / "model").iterdir())
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), \
        [(p.name, oct(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != 0o644]


@pytest.mark.parametrize("args, says", [
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--pixel-size", "0"], "is zero"),
    (["--pixel-size", "-3nm"], "is negative"),
    (["--pixel-size", "1e9nm"], "outside what an electron micrograph's pixel can be"),
])
def test_bad_options_get_one_clear_line(tmp_path, args, says):
    res = runner.invoke(app, ["analyze", str(disks(tmp_path / "a.png")), "-o", str(tmp_path / "out"),
                              "--model", "classical", *args])
    assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output


def test_cuda_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = runner.invoke(app, ["analyze", str(disks(tmp_path / "a.png")), "-o", str(tmp_path / "out"),
                              "--device", "cuda"])
    assert res.exit_code == 2 and "no usable GPU" in res.output


def test_a_missing_input_gives_one_error_only(tmp_path):
    res = runner.invoke(app, ["analyze", str(tmp_path / "missing.png"), "-o", str(tmp_path / "out"),
                              "--model", "classical"])
    assert res.exit_code == 1 and "file not found" in res.output
    assert "EmptyDataError" not in res.output and "unexpected" not in res.output


def test_a_failed_image_keeps_its_calibration_and_says_which_region(tmp_path):
    import tifffile

    img = np.zeros((200, 300), np.uint8)
    img[170:, :] = 255  # a bright bar with dark text under a uniform (blank) frame
    img[180:190, 20:120] = 0
    tifffile.imwrite(tmp_path / "blank.tif", img, imagej=True, resolution=(1 / 3.0, 1 / 3.0), metadata={"unit": "nm"})
    res = runner.invoke(app, ["analyze", str(tmp_path / "blank.tif"), "-o", str(tmp_path / "out"),
                              "--model", "classical", "--scale-bar", "off"])
    assert res.exit_code == 1
    row = pd.read_csv(tmp_path / "out" / "images.csv").iloc[0]
    assert row["status"] == "failed" and row["pixel_size_nm"] == pytest.approx(3.0)
    assert row["pixel_size_source"] == "tiff:ImageJ" and row["infobar_rows"] == 30
    assert "field above the 30-row info bar is uniform" in row["message"]


def test_a_rerun_says_what_it_reused_and_keeps_the_warnings(tmp_path):
    image = disks(tmp_path / "a.png")
    first = runner.invoke(app, ["analyze", str(image), "-o", str(tmp_path / "out"), "--model", "classical",
                                "--no-report", "--scale-bar", "off"])
    message = pd.read_csv(tmp_path / "out" / "images.csv").iloc[0]["message"]
    assert "pixel size unknown" in message
    again = runner.invoke(app, ["analyze", str(image), "-o", str(tmp_path / "out"), "--model", "classical",
                                "--no-report", "--scale-bar", "off"])
    assert first.exit_code == again.exit_code == 0
    assert "1 reused from an earlier run" in again.output
    assert pd.read_csv(tmp_path / "out" / "images.csv").iloc[0]["message"] == message


def test_interrupt_says_what_was_saved_and_how_to_go_on(tmp_path, monkeypatch):
    from emparticles import pipeline

    calls = []
    original = pipeline.analyse_path

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "analyse_path", interrupted)
    disks(tmp_path / "b.png")
    res = runner.invoke(app, ["analyze", str(disks(tmp_path / "a.png").parent), "-o", str(tmp_path / "out"),
                              "--model", "classical", "--no-report", "--scale-bar", "off"])
    assert res.exit_code == 130
    assert "1 image(s) finished are saved" in res.output and "run the same command again" in res.output
    assert len(pd.read_csv(tmp_path / "out" / "images.csv")) == 1


def test_non_square_pixels_are_recorded_and_warned():
    from emparticles.io import read_micrograph

    from .conftest import VENDOR, need

    mg = read_micrograph(need(VENDOR) / "FEI-Helios-navcam.tif")
    assert any("not square" in n for n in mg.notes)
    from emparticles.pipeline import pixel_size_xy

    xy = pixel_size_xy(mg)
    assert xy["pixel_size_x_nm"] == pytest.approx(263973.96, rel=1e-6)
    assert xy["pixel_size_y_nm"] == pytest.approx(263974.61, rel=1e-6)


def test_help_has_no_bool_values_and_describes_every_option():
    for command in ("analyze", "train", "synth", "finetune", "calibrate"):
        res = runner.invoke(app, [command, "--help"], terminal_width=200, env={"COLUMNS": "200"})
        lines = [ln for ln in res.output.splitlines() if ln.strip().startswith("│    --") and "--help" not in ln]
        assert not [ln for ln in lines if "<bool>" in ln], command
        assert "the first listed" not in res.output and "trained models only" not in res.output
