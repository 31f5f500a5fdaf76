"""Particles on text drawn over the field (panel letters, scale-bar labels) are left out."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from emparticles.figure_text import MIN_TEXT_SCORE, particles_on_text
from emparticles.models import load_model
from emparticles.pipeline import segment_micrograph
from emparticles.types import Micrograph

DISCS = [(150, 140), (220, 300), (300, 180), (160, 420), (320, 400), (250, 80)]


def figure_with_text() -> np.ndarray:
    """A figure panel: six dark discs of radius 22 on a light field, a panel letter "(a)" in its
    top-left corner and a "200 nm" label at the bottom right, both in dark ink like the discs."""
    img = np.full((400, 520), 200, np.uint8)
    for y, x in DISCS:
        cv2.circle(img, (x, y), 22, 60, -1)
    cv2.putText(img, "(a)", (8, 42), cv2.FONT_HERSHEY_SIMPLEX, 1.2, 30, 3, cv2.LINE_AA)
    cv2.putText(img, "200 nm", (360, 385), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 30, 2, cv2.LINE_AA)
    noise = np.random.default_rng(0).normal(0, 4, img.shape)
    return (img + noise).clip(0, 255).astype(np.uint8)


def test_glyphs_found_as_particles_are_left_out_and_the_particles_kept():
    mg = Micrograph(figure_with_text())
    model = load_model("classical", "cpu")  # it takes every dark glyph for a particle
    kept_all, _ = segment_micrograph(mg, model, figure_text=False)
    assert kept_all.count == 14  # six discs, three glyphs of "(a)", five of "200 nm"
    notes: list[str] = []
    inst, full = segment_micrograph(mg, model, notes=notes)
    assert inst.count == 6
    centres = sorted((round(float(np.mean(np.nonzero(inst.labels == i)[0]))),
                      round(float(np.mean(np.nonzero(inst.labels == i)[1])))) for i in range(1, 7))
    assert centres == sorted(DISCS)
    assert full.max() == 6 and inst.scores.shape == (6,)
    assert len(notes) == 1 and notes[0].startswith("8 objects on text") and '"(a)"' in notes[0]
    assert '"200 nm"' in notes[0] and "--keep-figure-text" in notes[0]


def test_text_found_beside_the_segmentation_leaves_the_same_particles(tmp_path):
    from PIL import Image

    from emparticles.pipeline import AnalysisSettings, analyse_path

    Image.fromarray(figure_with_text()).save(tmp_path / "panel.png")
    model = load_model("classical", "cpu")
    # the text lines are detected in a second thread while the field is segmented ...
    result = analyse_path(tmp_path / "panel.png", model, AnalysisSettings(pixel_size_nm=2.0))
    assert result.instances.count == 6
    assert any(w.startswith("8 objects on text") for w in result.warnings)
    # ... as when the bar is read first (--scale-bar off: everything in one thread)
    serial = analyse_path(tmp_path / "panel.png", model, AnalysisSettings(pixel_size_nm=2.0, scale_bar="off"))
    np.testing.assert_array_equal(serial.full_labels, result.full_labels)
    kept = analyse_path(tmp_path / "panel.png", model, AnalysisSettings(pixel_size_nm=2.0, keep_figure_text=True))
    assert kept.instances.count == 14


def test_a_row_of_rings_is_not_text():
    # hollow spheres in a row: the recogniser reads such a line as "0000" (score 0.8-0.9)
    img = np.full((300, 400), 200, np.uint8)
    for k in range(4):
        cv2.circle(img, (100 + 60 * k, 170), 20, 50, 4)
    cv2.putText(img, "(a)", (8, 42), cv2.FONT_HERSHEY_SIMPLEX, 1.2, 30, 3, cv2.LINE_AA)
    img = (img + np.random.default_rng(0).normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8)
    notes: list[str] = []
    inst, _ = segment_micrograph(Micrograph(img), load_model("classical", "cpu"), notes=notes)
    centres = sorted(round(float(np.mean(np.nonzero(inst.labels == i)[1]))) for i in range(1, inst.count + 1))
    assert inst.count == 4 and all(abs(c - x) <= 1 for c, x in zip(centres, (100, 160, 220, 280)))
    assert len(notes) == 1 and '("(a)")' in notes[0]


def _labels_with_two_squares() -> np.ndarray:
    labels = np.zeros((320, 240), np.int32)  # the detector's own size; a line may be 64 rows tall here
    labels[20:40, 20:40] = 1
    labels[60:80, 150:170] = 2
    labels[140:160, 100:120] = 3  # in the middle of the field
    return labels


@pytest.mark.parametrize(("box", "text", "score", "flagged"), [
    ((10, 10, 60, 50), "b", 0.95, [1]),  # a letter over particle 1
    ((10, 10, 60, 50), "b", MIN_TEXT_SCORE - 0.01, []),  # read too poorly to be text
    ((10, 10, 60, 50), "--", 0.99, []),  # no letter or digit
    ((10, 10, 60, 50), "0000", 0.87, []),  # a row of rings
    ((10, 10, 60, 50), "O", 0.68, []),  # a lone ring
    ((10, 10, 60, 50), "\uff4f\uff4f\uff4f", 0.9, []),  # rings read as full-width o's
    ((10, 10, 60, 50), "20 nm", 0.9, [1]),  # a label: its zeros count with the rest
    ((10, 10, 60, 50), "11", 0.97, []),  # rods
    ((10, 10, 60, 50), "\u2162\u2162", 0.77, []),  # rods read as Roman threes
    ((10, 10, 60, 50), "\u4e00\u4e00", 0.77, []),  # rods read as CJK ones
    ((10, 10, 60, 50), "3\u00b5m", 0.8, [1]),  # micro sign folded to mu
    ((95, 135, 125, 165), "b", 0.99, []),  # in the middle of the field: no figure's lettering
    ((0, 0, 240, 320), "88", 0.99, []),  # the whole field boxed: no line of text is that tall
    ((0, 0, 240, 65), "b", 0.99, []),  # a fifth of the field and one row more
    ((30, 0, 60, 60), "b", 0.95, [1]),  # 12 of particle 1's 20 columns in the box grown by 2 px
    ((33, 0, 60, 60), "b", 0.95, []),  # 9 of them
    ((10, 15, 180, 78), "b", 0.95, [1, 2]),  # both
])
def test_the_rules_of_what_counts_as_text(monkeypatch, box, text, score, flagged):
    from emparticles.io import scalebar

    read = []
    monkeypatch.setattr(scalebar, "text_boxes", lambda img: [box])
    monkeypatch.setattr(scalebar, "recognise", lambda img, b: read.append(b) or (text, score))
    flags, lines = particles_on_text(np.zeros((320, 240), np.uint8), _labels_with_two_squares())
    assert np.flatnonzero(flags).tolist() == flagged
    assert [line.text for line in lines] == ([text] if flagged else [])
    if box[3] - box[1] > 64:  # a box too tall is not even read (reading is the costly step)
        assert read == []


def test_a_line_of_text_over_no_particle_is_not_read(monkeypatch):
    from emparticles.io import scalebar

    monkeypatch.setattr(scalebar, "text_boxes", lambda img: [(200, 200, 230, 230)])
    monkeypatch.setattr(scalebar, "recognise", lambda img, b: pytest.fail("read a line that holds no particle"))
    flags, lines = particles_on_text(np.zeros((320, 240), np.uint8), _labels_with_two_squares())
    assert not flags.any() and lines == []


def test_no_particles_no_detection(monkeypatch):
    from emparticles.io import scalebar

    monkeypatch.setattr(scalebar, "text_boxes", lambda img: pytest.fail("ran the detector on an empty result"))
    flags, lines = particles_on_text(np.zeros((50, 50), np.uint8), np.zeros((50, 50), np.int32))
    assert flags.tolist() == [False] and lines == []


def test_lines_found_on_the_shrunk_field_are_placed_on_the_field():
    from emparticles.figure_text import DETECT_SIDE_PX, _detected_lines

    seen = []
    field = np.zeros((2 * DETECT_SIDE_PX * 3 // 4, 2 * DETECT_SIDE_PX), np.uint8)  # shrunk by half
    lines = _detected_lines(field, lambda img: seen.append(img.shape) or [(10, 20, 31, 41), (300, 200, 320, 240)])
    assert seen == [(DETECT_SIDE_PX * 3 // 4, DETECT_SIDE_PX)]
    assert lines == [(20, 40, 62, 82), (600, 400, 640, 480)]
    small = np.zeros((100, 200), np.uint8)  # never enlarged
    assert _detected_lines(small, lambda img: seen.append(img.shape) or [(1, 2, 3, 4)]) == [(1, 2, 3, 4)]
    assert seen[-1] == (100, 200)


class _SignallingClassical:
    """The classical model behind a ``segment`` that takes ``network_done`` (as the trained
    networks' does), logging when it is called and when the second thread's work begins."""

    def __init__(self, log: list, fail: bool = False):
        self.inner, self.log, self.fail = load_model("classical", "cpu"), log, fail
        self.model_id = "classical"

    def segment(self, pixels, particle_size_px=None, network_done=None):
        if self.fail:
            from emparticles.errors import InputError

            raise InputError(None, "the network failed", "nothing")
        self.log.append("network")
        network_done()
        self.log.append("done")
        return self.inner.segment(pixels, particle_size_px)


def test_the_second_thread_waits_for_the_network(tmp_path, monkeypatch):
    import threading

    from PIL import Image

    from emparticles import figure_text, pipeline
    from emparticles.errors import EmparticlesError

    Image.fromarray(figure_with_text()).save(tmp_path / "panel.png")
    log: list[str] = []
    text_lines, calibrate = figure_text.text_lines_over, pipeline.calibrate_from_scale_bar

    def logged(name, work):
        def run(*args):
            log.append(f"{name} in {'main' if threading.current_thread() is threading.main_thread() else 'second'}")
            return work(*args)
        return run

    monkeypatch.setattr(figure_text, "text_lines_over", logged("text", text_lines))
    monkeypatch.setattr(pipeline, "calibrate_from_scale_bar", logged("bar", calibrate))
    monkeypatch.setattr(pipeline, "_threads_allowed", lambda: 2)
    result = pipeline.analyse_path(tmp_path / "panel.png", _SignallingClassical(log), pipeline.AnalysisSettings())
    assert log[:2] == ["network", "done"]  # nothing in the second thread before the network is done
    assert sorted(log[2:]) == ["bar in second", "text in second"] and log.index("text in second") < log.index("bar in second")
    assert result.instances.count == 6  # the figure's text found there still leaves the glyphs out
    # a segmentation that fails before it signals leaves no thread waiting: the error comes back
    log.clear()
    with pytest.raises(EmparticlesError, match="the network failed") as failed:
        pipeline.analyse_path(tmp_path / "panel.png", _SignallingClassical(log, fail=True), pipeline.AnalysisSettings())
    assert failed.value.known["width_px"] == 520
