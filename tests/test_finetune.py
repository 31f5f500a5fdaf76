"""emparticles finetune: ROI-zip masks, the time budget, the not-better guard, interruption, NaN,
the rotation of the held-out images."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from emparticles.io.exports import read_imagej_rois, write_imagej_rois
from emparticles.train import finetune as ft

from .conftest import disks_image


def test_roi_zip_round_trip_is_pixel_exact(tmp_path):
    lab = np.zeros((60, 80), np.int32)
    yy, xx = np.mgrid[:60, :80]
    lab[((yy - 20) ** 2 + (xx - 20) ** 2) <= 81] = 3
    lab[((yy - 20) ** 2 + (xx - 38) ** 2) <= 64] = 7  # touching 3, painted over it
    lab[40:55, 50:75] = 12
    lab[45:50, 60:65] = 0  # a hole in 12 ...
    lab[46:49, 61:64] = 15  # ... with a particle inside it
    lab[0:6, 70:80] = 4  # at the border
    write_imagej_rois(lab, tmp_path / "r.zip")
    back = read_imagej_rois(tmp_path / "r.zip", lab.shape)
    expected = lab.copy()
    expected[45:50, 60:65][lab[45:50, 60:65] == 0] = 12  # ImageJ's traced ROI covers the hole
    np.testing.assert_array_equal(back, expected)
    with pytest.raises(Exception, match="not an ImageJ ROI set"):
        (tmp_path / "bad.zip").write_bytes(b"not a zip")
        read_imagej_rois(tmp_path / "bad.zip", lab.shape)


@pytest.mark.parametrize("case", ["blobs", "one pixel", "far out", "many vertices"])
def test_traced_roi_bytes_are_roifiles(case):
    import roifile

    from emparticles.io.exports import traced_roi_bytes
    from emparticles.measure import particle_outlines

    if case == "blobs":  # particles of a synthetic frame: touching, at the border, with holes
        from emparticles.synth import SynthSettings, synth_sem

        outlines = list(particle_outlines(synth_sem(np.random.default_rng(5), SynthSettings(width=300, height=200)).labels).items())
    elif case == "one pixel":
        lab = np.zeros((5, 5), np.int32)
        lab[0, 0] = 3
        outlines = list(particle_outlines(lab).items())
    elif case == "far out":  # past int16 (a montage of 40,000 px): roifile wraps the box, as here
        outlines = [(1, np.array([[40_000, 33_000], [40_010, 33_000], [40_010, 33_004], [40_000, 33_004]]))]
    else:  # more vertices than the header's 16-bit count holds
        t = np.arange(70_000)
        outlines = [(2, np.column_stack([t // 2 + (t % 2), t // 2]))]
    assert outlines
    for label, pts in outlines:
        roi = roifile.ImagejRoi.frompoints(pts.astype(np.float64), name=f"{label:05d}")
        roi.roitype = roifile.ROI_TYPE.TRACED
        assert traced_roi_bytes(pts, f"{label:05d}") == roi.tobytes(), label


def test_roi_zip_holds_what_roifile_writes(tmp_path):
    """The zip put together in memory has roifile's entries, byte for byte, in its order."""
    import zipfile

    import roifile

    from emparticles.measure import particle_outlines

    lab = np.zeros((50, 70), np.int32)
    lab[5:20, 5:25] = 2
    lab[25:45, 30:60] = 9
    lab[30:35, 40:45] = 0
    write_imagej_rois(lab, tmp_path / "ours.zip")
    rois = []
    for label, pts in particle_outlines(lab).items():
        roi = roifile.ImagejRoi.frompoints(pts.astype(np.float64), name=f"{label:05d}")
        roi.roitype = roifile.ROI_TYPE.TRACED
        rois.append(roi)
    roifile.roiwrite(tmp_path / "roifile.zip", rois, mode="w")
    with zipfile.ZipFile(tmp_path / "ours.zip") as ours, zipfile.ZipFile(tmp_path / "roifile.zip") as theirs:
        assert ours.namelist() == theirs.namelist() == ["00002.roi", "00009.roi"]
        assert all(ours.read(n) == theirs.read(n) for n in ours.namelist())
    write_imagej_rois(np.zeros((4, 4), np.int32), tmp_path / "none.zip")
    with zipfile.ZipFile(tmp_path / "none.zip") as empty:
        assert empty.namelist() == []


def test_roi_sets_drawn_in_fiji_rectangles_ovals_and_unnamed(tmp_path):
    import roifile

    rect = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, top=2, left=3, bottom=6, right=10, name="a")
    oval = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.OVAL, top=10, left=10, bottom=20, right=20, name="b")
    roifile.roiwrite(tmp_path / "fiji.zip", [rect, oval], mode="w")
    lab = read_imagej_rois(tmp_path / "fiji.zip", (30, 30))
    assert (lab == 1).sum() == 4 * 7 and (lab[2:6, 3:10] == 1).all()  # names not numbers: 1..N in order
    yy, xx = np.mgrid[:30, :30]
    disk = ((yy + 0.5 - 15) / 5) ** 2 + ((xx + 0.5 - 15) / 5) ** 2 <= 1
    np.testing.assert_array_equal(lab == 2, disk)


def write_set(folder, count=4, rois=False):
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    for k in range(count):
        centres = [(rng.uniform(15, 81), rng.uniform(15, 81)) for _ in range(4)]
        img, lab = disks_image(centres, radius=9, shape=(96, 96), seed=k)
        Image.fromarray(img).save(folder / "images" / f"img{k}.png")
        if rois:
            write_imagej_rois(lab, folder / "masks" / f"img{k}.zip")
        else:
            Image.fromarray(lab.astype(np.uint16)).save(folder / "masks" / f"img{k}.png")
    return folder / "images", folder / "masks"


def test_read_annotated_takes_label_images_or_roi_zips(tmp_path):
    images, masks = write_set(tmp_path / "png")
    images2, masks2 = write_set(tmp_path / "zip", rois=True)
    a, b = ft.read_annotated(images, masks), ft.read_annotated(images2, masks2)
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == ["img0", "img1", "img2", "img3"]
    for (_, _, la), (_, _, lb) in zip(a, b):
        assert ((la > 0) == (lb > 0)).all() and la.max() == lb.max()
    with pytest.raises(Exception, match="no annotation matches"):
        ft.read_annotated(images, tmp_path)


def test_annotated_fields_leave_the_info_bar_out(tmp_path):
    """Fine-tuning learns from the field that segmentation will see: no info bar, normalised without it."""
    import tifffile

    from emparticles.preprocess import normalise

    from .test_infobar import sem_frame, zeiss_like

    frame = sem_frame(seed=3)
    img = zeiss_like(frame, 60)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "sem.tif", img)
    lab = np.zeros(img.shape, np.uint16)
    lab[10:30, 10:30] = 1
    tifffile.imwrite(tmp_path / "masks" / "sem.tif", lab)
    [(stem, field, labels)] = ft.read_annotated(tmp_path / "images", tmp_path / "masks")
    rows = img.shape[0] - 60
    assert stem == "sem" and field.shape == labels.shape == (rows, img.shape[1])
    np.testing.assert_allclose(field, normalise(img[:rows]))
    assert (labels == 1).sum() == 400


def test_budget_is_honoured_and_the_folder_is_a_model(tmp_path):
    from emparticles.models import load_model

    images, masks = write_set(tmp_path)
    data = ft.read_annotated(images, masks)
    # 0.5 minutes: on a loaded machine the base's scoring and the reserves took all of 0.3
    cfg = ft.FinetuneConfig(minutes=0.5, crop=96, batch_size=2)
    t = time.monotonic()
    result = ft.finetune(data, tmp_path / "model", cfg, images_dir=images, log=lambda m: None)
    took = time.monotonic() - t
    assert took < 0.5 * 60 + 15, took  # the budget plus a margin for a loaded machine
    assert result.steps > 0 and result.holdout_images and result.kept in ("fine-tuned", "base")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["finetune"]["held_out_images"] == result.holdout_images
    # the folder is not a second default, and says what it is
    assert "default" not in config and "validation_tuned" not in config
    assert config["description"].startswith(f"{ft.resolve_base('').name} fine-tuned with `emparticles finetune` on ")
    assert "Kept:" in (tmp_path / "model" / "MODEL_CARD.md").read_text()
    seg = load_model(str(tmp_path / "model"), "cpu")
    inst, _ = seg.segment(data[0][1])
    assert inst.labels.shape == (96, 96)


def test_not_better_keeps_the_base(tmp_path, monkeypatch):
    images, masks = write_set(tmp_path)
    data = ft.read_annotated(images, masks)
    calls = []

    def scripted(truths, preds, outlines="particles"):
        calls.append(preds)
        f1 = 0.80 if len(calls) == 1 else 0.70  # the fine-tuned model scores worse
        return {"f1": f1, "foreground_iou": 0.9, "count_ratio": 1.0, "precision": f1, "recall": f1,
                "panoptic_quality": f1, "d50_rel_error": 0.0}

    monkeypatch.setattr(ft, "figures", scripted)
    result = ft.finetune(data, tmp_path / "model", ft.FinetuneConfig(minutes=0.5, crop=96, batch_size=2),
                         images_dir=images, log=lambda m: None)
    assert result.kept == "base" and "not better" in result.reason
    base = load_file(str(ft.resolve_base("") / "weights.safetensors"))
    kept = load_file(str(tmp_path / "model" / "weights.safetensors"))
    assert all(np.array_equal(base[k].numpy(), kept[k].numpy()) for k in base)
    card = (tmp_path / "model" / "MODEL_CARD.md").read_text()
    assert "Kept: base" in card and "| f1 | 0.800 | 0.700 |" in card
    # the turned-down attempt is kept beside, as a model of its own with other weights
    from emparticles.models import load_model

    attempt = load_file(str(tmp_path / "model" / "rejected" / "weights.safetensors"))
    assert any(not np.array_equal(base[k].numpy(), attempt[k].numpy()) for k in base)
    assert "rejected" in result.reason
    load_model(str(tmp_path / "model" / "rejected"), "cpu")
    load_model(str(tmp_path / "model"), "cpu")  # the folder itself still loads as the base


def test_the_verdict_forgives_f1_of_one_held_out_particle_not_two():
    def fig(tp, n_true, n_pred, iou):
        return {"f1": 2 * tp / (n_true + n_pred), "foreground_iou": iou, "true": n_true, "predicted": n_pred}

    # a sparse held-out frame of 15 agglomerates: three more predictions that match nothing cost
    # F1 0.028, less than one match (2 / 27 = 0.074), while the foreground gains 0.09
    base = fig(3, 15, 9, 0.311)
    assert ft.keeps_fine_tuned(base, fig(3, 15, 12, 0.404))
    assert not ft.keeps_fine_tuned(base, fig(2, 15, 12, 0.404))  # one match lost: F1 0.148, 0.102 down
    assert not ft.keeps_fine_tuned(base, fig(3, 15, 12, 0.330))  # together they gain too little
    # the same F1 drop over 1,000 particles is 28 of them: turned down
    dense_base = fig(250, 1000, 1000, 0.90)
    assert abs(dense_base["f1"] - 0.25) < 1e-12
    assert not ft.keeps_fine_tuned(dense_base, fig(222, 1000, 1000, 0.99))
    assert ft.keeps_fine_tuned(dense_base, fig(246, 1000, 1000, 0.99))  # 0.004: within MAX_F1_LOSS
    # figures() gives the counts the allowance needs
    truth = np.zeros((40, 40), np.int32)
    truth[2:8, 2:8], truth[20:28, 20:28] = 1, 2
    pred = np.zeros_like(truth)
    pred[2:8, 2:8] = 1
    out = ft.figures([truth], [pred])
    assert (out["true"], out["predicted"], out["matched"]) == (2, 1, 1)


def test_interruption_leaves_a_usable_folder(tmp_path, monkeypatch):
    from emparticles.models import load_model
    from emparticles.train import data as data_mod

    images, masks = write_set(tmp_path)
    original, calls = data_mod.augmented_sample, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 6:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(data_mod, "augmented_sample", interrupted)
    result = ft.finetune(ft.read_annotated(images, masks), tmp_path / "model",
                         ft.FinetuneConfig(minutes=2, crop=96, batch_size=2), images_dir=images, log=lambda m: None)
    assert "interrupted" in result.reason and result.steps == 3
    assert not (tmp_path / "model.writing").exists()
    load_model(str(tmp_path / "model"), "cpu").segment(np.zeros((64, 64), np.float32) + np.eye(64, dtype=np.float32))


def test_a_non_finite_loss_stops_with_a_message(tmp_path, monkeypatch):
    import torch

    from emparticles.train import loop

    images, masks = write_set(tmp_path)
    original, calls, inside = loop.segmentation_loss, [], []

    def exploding(*args, **kwargs):
        # one count per training step: a network with a distance output calls the loss again for
        # its class outputs
        outer = not inside
        calls.extend([1] if outer else [])
        inside.append(1)
        try:
            loss = original(*args, **kwargs)
        finally:
            inside.pop()
        return loss * torch.tensor(float("nan")) if outer and len(calls) == 4 else loss

    monkeypatch.setattr(loop, "segmentation_loss", exploding)
    messages = []
    result = ft.finetune(ft.read_annotated(images, masks), tmp_path / "model",
                         ft.FinetuneConfig(minutes=1, crop=96, batch_size=2), images_dir=images, log=messages.append)
    assert result.steps == 3 and any("loss became nan" in m for m in messages)
    assert "loss became nan" in result.reason
    weights = load_file(str(tmp_path / "model" / "weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_a_base_with_local_contrast_fine_tunes_and_keeps_its_stage(tmp_path, monkeypatch):
    from emparticles.models import load_model
    from emparticles.models.cnn import load_network, save_model_folder
    from emparticles.models.networks import WithLocalContrast, build_network
    from emparticles.train.loop import load_matching_weights

    shipped = ft.resolve_base("")
    config = json.loads((shipped / "config.json").read_text())
    net = build_network(config["arch"], len(config["channels"]), local_contrast_px=16)
    load_matching_weights(net, load_file(str(shipped / "weights.safetensors")))
    base = save_model_folder(net.eval(), tmp_path / "base", {**config, "name": "lc-base", "local_contrast_px": 16},
                             json.loads((shipped / "thresholds.json").read_text()))
    images, masks = write_set(tmp_path)
    data = ft.read_annotated(images, masks)
    calls = []

    def scripted(truths, preds, outlines="particles"):  # the attempt scores worse: the base is written back, the attempt beside it
        calls.append(preds)
        f1 = 0.80 if len(calls) == 1 else 0.70
        return {"f1": f1, "foreground_iou": 0.9, "count_ratio": 1.0, "precision": f1, "recall": f1,
                "panoptic_quality": f1, "d50_rel_error": 0.0}

    monkeypatch.setattr(ft, "figures", scripted)
    result = ft.finetune(data, tmp_path / "model", ft.FinetuneConfig(base=str(base), minutes=0.5, crop=96, batch_size=2),
                         images_dir=images, log=lambda m: None)
    assert result.kept == "base"
    for folder in (tmp_path / "model", tmp_path / "model" / "rejected"):
        again, cfg, _ = load_network(folder)
        assert isinstance(again, WithLocalContrast) and cfg["local_contrast_px"] == 16
        load_model(str(folder), "cpu").segment(data[0][1])
    kept = load_file(str(tmp_path / "model" / "weights.safetensors"))
    original = load_file(str(base / "weights.safetensors"))
    assert all(np.array_equal(original[k].numpy(), kept[k].numpy()) for k in original)


def test_rotation_folds_hold_out_whole_quarters_and_start_with_the_single_split(tmp_path):
    images, _ = write_set(tmp_path, count=5)
    stems = [f"img{k}" for k in range(5)]
    folds = ft.rotation_folds(stems, images)
    # one source: every frame its own group, a quarter of five is one frame
    assert sorted(s for f in folds for s in f) == stems and all(len(f) == 1 for f in folds)
    train, hold = ft.held_out(stems, images)
    assert hold == folds[0] and sorted(train + hold) == stems
    assert ft.rotation_folds(stems[:2], images) == []  # too few to hold any out
    # 8 frames: folds of two, never the whole set
    images8, _ = write_set(tmp_path / "eight", count=8)
    folds8 = ft.rotation_folds([f"img{k}" for k in range(8)], images8)
    assert [len(f) for f in folds8] == [2, 2, 2, 2]


def test_rounds_follow_the_budget():
    cfg = ft.FinetuneConfig()
    overheads, soup = [60.0] * 5, 70.0
    # ten minutes leave one round of about eight minutes; twenty two of six or more; 25 three
    assert ft._rounds(cfg, overheads, soup, 600 - 30) == 1
    assert ft._rounds(cfg, overheads, soup, 1200 - 30) == 2
    assert ft._rounds(cfg, overheads, soup, 1500 - 30) == 3
    assert ft._rounds(ft.FinetuneConfig(rounds=4), overheads, soup, 60) == 4  # asked for: as many as asked
    assert ft._rounds(ft.FinetuneConfig(rounds=9), overheads, soup, 60) == 5  # at most one per fold
    assert ft._rounds(ft.FinetuneConfig(rounds=3), [], soup, 600) == 1  # nothing to hold out


def test_averaged_weights_are_the_mean():
    import torch

    a, b = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        a.weight.fill_(1.0)
        b.weight.fill_(3.0)
    a.num_batches_tracked.fill_(7)
    mean = ft.averaged_weights([a, b])
    assert torch.equal(mean["weight"], torch.full((3,), 2.0))
    assert mean["num_batches_tracked"].dtype == torch.long and int(mean["num_batches_tracked"]) == 7


def test_rotation_judges_every_held_out_image_by_a_round_that_never_saw_it(tmp_path, monkeypatch):
    from emparticles.models import load_model

    images, masks = write_set(tmp_path, count=4)
    data = ft.read_annotated(images, masks)
    seen = []

    def scripted(truths, preds, outlines="particles"):  # base first, then the rounds together, then each round
        seen.append(len(truths))
        f1 = 0.70 if len(seen) == 1 else 0.85
        return {"f1": f1, "foreground_iou": 0.9, "count_ratio": 1.0, "precision": f1, "recall": f1,
                "panoptic_quality": f1, "d50_rel_error": 0.0}

    monkeypatch.setattr(ft, "figures", scripted)
    result = ft.finetune(data, tmp_path / "model", ft.FinetuneConfig(minutes=0.5, crop=96, batch_size=2, rounds=2, tune=False),
                         images_dir=images, log=lambda m: None)
    folds = ft.rotation_folds([s for s, _, _ in data], images)
    assert result.rounds == 2 and result.kept == "fine-tuned"
    assert result.holdout_images == folds[0] + folds[1] and sorted(result.train_images) == sorted(s for s, _, _ in data)
    assert seen[:2] == [2, 2] and seen[2:] == [1, 1, 1, 1]  # pooled over both rounds' images, then per round
    record = json.loads((tmp_path / "model" / "config.json").read_text())["finetune"]
    assert [r["held_out"] for r in record["rounds"]] == folds[:2] and all(r["steps"] > 0 for r in record["rounds"])
    card = (tmp_path / "model" / "MODEL_CARD.md").read_text()
    assert "rotated over 2 rounds" in card and "| 1 | " in card and "| 2 | " in card
    # the kept weights are the mean of the two rounds', which are models of their own
    kept = load_file(str(tmp_path / "model" / "weights.safetensors"))
    r1 = load_file(str(tmp_path / "model" / "rounds" / "1" / "weights.safetensors"))
    r2 = load_file(str(tmp_path / "model" / "rounds" / "2" / "weights.safetensors"))
    changed = [k for k in kept if kept[k].is_floating_point() and not np.array_equal(r1[k].numpy(), r2[k].numpy())]
    assert changed
    for k in changed:
        np.testing.assert_allclose(kept[k].numpy(), (r1[k].numpy() + r2[k].numpy()) / 2, rtol=1e-5, atol=1e-6)
    for folder in ("model", "model/rounds/1", "model/rounds/2"):
        load_model(str(tmp_path / folder), "cpu").segment(data[0][1])


def test_the_command_rotates_when_asked(tmp_path):
    from typer.testing import CliRunner

    from emparticles.cli import app

    images, masks = write_set(tmp_path, count=4)
    res = CliRunner().invoke(app, ["finetune", "--images", str(images), "--masks", str(masks), "-o",
                                   str(tmp_path / "model"), "--minutes", "0.5", "--rounds", "2"])
    assert res.exit_code == 0, res.output
    assert "2 rounds, holding out" in res.output and "use it with --model" in res.output
    record = json.loads((tmp_path / "model" / "config.json").read_text())["finetune"]
    assert record["settings"]["rounds"] == 2 and len(record["rounds"]) == 2
    assert (tmp_path / "model" / "rounds" / "2" / "weights.safetensors").is_file()
    bad = CliRunner().invoke(app, ["finetune", "--images", str(images), "--masks", str(masks), "-o",
                                   str(tmp_path / "m2"), "--rounds", "-1"])
    assert bad.exit_code != 0


def test_tuning_stops_at_its_deadline_with_the_best_so_far():
    import time as _time

    from emparticles.train.loop import tune_thresholds, tuning_trials

    yy, xx = np.mgrid[:64, :64]
    labels = np.zeros((64, 64), np.int32)
    labels[(yy - 20) ** 2 + (xx - 20) ** 2 <= 64] = 1
    labels[(yy - 44) ** 2 + (xx - 44) ** 2 <= 64] = 2
    particle = np.where(labels > 0, 0.45, 0.05).astype(np.float32)  # under the default threshold of 0.5
    border = np.full_like(particle, 0.05)
    probs = [np.stack([1 - particle - border, particle, border])]
    data = [(particle, labels)]
    found, f1 = tune_thresholds(probs, data)
    assert f1 == 1.0 and found["foreground_threshold"] < 0.45
    late, f1_late = tune_thresholds(probs, data, deadline=_time.monotonic() - 1)
    assert f1_late == 0.0 and late["foreground_threshold"] == 0.5  # nothing tried: the start stands
    assert tuning_trials(3) == 50 and tuning_trials(4) == 60


def test_agglomerate_outlines_are_scored_as_agglomerates():
    """Two touching discs under one annotated label: a prediction that parts them is right at the
    agglomerate level, and one that finds a single disc of the two is not."""
    yy, xx = np.mgrid[:60, :90]
    a = ((yy - 30) ** 2 + (xx - 20) ** 2) <= 100
    b = ((yy - 30) ** 2 + (xx - 39) ** 2) <= 100  # touches a
    c = ((yy - 30) ** 2 + (xx - 72) ** 2) <= 64  # free
    truth = np.zeros((60, 90), np.int32)
    truth[a | b] = 5
    truth[c] = 9
    parted = np.zeros_like(truth)
    parted[a], parted[b & ~a], parted[c] = 1, 2, 3
    at_particles = ft.figures([truth], [parted])
    at_agglomerates = ft.figures([truth], [parted], "agglomerates")
    assert at_particles["f1"] == pytest.approx(0.8)  # 3 predicted against 2 annotated, 2 matched
    assert at_agglomerates["f1"] == 1.0 and at_agglomerates["count_ratio"] == 1.0
    core = parted.copy()
    core[(core == 2) | ((core == 1) & (((yy - 30) ** 2 + (xx - 20) ** 2) > 49))] = 0  # the core of one disc
    assert ft.figures([truth], [core], "agglomerates")["f1"] == pytest.approx(0.5)  # IoU 0.25 with the pair
    # pieces of one drawn agglomerate under several labels are still one agglomerate
    split_truth = truth.copy()
    split_truth[b & ~a] = 6
    assert ft.figures([split_truth], [parted], "agglomerates")["f1"] == 1.0
    # training: agglomerate outlines are foreground whose partings are not known
    from emparticles.train.targets import FOREGROUND_ONLY, class_weights, three_class_target

    target = three_class_target(ft.training_labels(truth, "agglomerates"), 2)
    assert set(np.unique(target)) == {0, FOREGROUND_ONLY} and (target == FOREGROUND_ONLY).sum() == (truth > 0).sum()
    assert np.isfinite(class_weights([target])).all() and class_weights([target]).max() < 2
    np.testing.assert_array_equal(ft.training_labels(truth, "particles"), truth)
    # the base's particles say where particles part inside an agglomerate; what it missed stays unknown,
    # what it found outside the annotation is background
    base = np.zeros_like(truth)
    base[a], base[b & ~a] = 1, 2  # the pair parted, the free disc missed ...
    base[5:10, 5:10] = 3  # ... and a speck of substrate taken for a particle
    anchored = ft.training_labels(truth, "agglomerates", base)
    assert (anchored[a] == 1).all() and (anchored[b & ~a] == 2).all()
    assert (anchored[c] == -1).all() and (anchored[5:10, 5:10] == 0).all()
    target = three_class_target(anchored, 2)
    assert (target[30, 29:31] == 2).all()  # the seam between the pair is taught as border


def test_the_command_fine_tunes_on_agglomerate_outlines(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from emparticles.cli import app

    images, masks = write_set(tmp_path, count=4)
    for m in masks.iterdir():  # redraw each mask at agglomerate level: one label for all
        lab = np.array(Image.open(m))
        Image.fromarray(((lab > 0) * 1).astype(np.uint16)).save(m)
    res = CliRunner().invoke(app, ["finetune", "--images", str(images), "--masks", str(masks), "-o",
                                   str(tmp_path / "model"), "--minutes", "0.5", "--outlines", "agglomerates"])
    assert res.exit_code == 0, res.output
    assert "outline agglomerates" in res.output
    record = json.loads((tmp_path / "model" / "config.json").read_text())["finetune"]
    assert record["settings"]["outlines"] == "agglomerates" and record["steps"] > 0
    assert "as agglomerates" in (tmp_path / "model" / "MODEL_CARD.md").read_text()
    bad = CliRunner().invoke(app, ["finetune", "--images", str(images), "--masks", str(masks), "-o",
                                   str(tmp_path / "m2"), "--outlines", "clumps"])
    assert bad.exit_code != 0 and "clumps" in bad.output


def test_a_base_that_enlarges_its_input_is_fine_tuned_at_the_size_its_network_sees(tmp_path, monkeypatch):
    import shutil

    from emparticles.train import data as train_data

    shipped = ft.resolve_base("")
    base = tmp_path / "base"
    shutil.copytree(shipped, base)
    config = json.loads((base / "config.json").read_text())
    config.pop("scale_search", None)  # scale 1 for every image: the base's own x2 is all there is
    (base / "config.json").write_text(json.dumps({**config, "name": "x2-base", "input_scale": 2.0}))
    images, masks = write_set(tmp_path)
    data = ft.read_annotated(images, masks)
    ranges = []

    class Stop(Exception):
        pass

    def captured(crop, scale_range, *args, **kwargs):
        ranges.append(scale_range)
        raise Stop

    monkeypatch.setattr(train_data, "augmenter", captured)
    with pytest.raises(Stop):
        ft.finetune(data, tmp_path / "model", ft.FinetuneConfig(base=str(base), minutes=0.5, crop=96, batch_size=2),
                    images_dir=images, log=lambda m: None)
    assert ranges == [pytest.approx((1.6, 2.5))]  # crops resampled around x2, as the network sees the images
    written = json.loads((tmp_path / "model" / "config.json").read_text())  # the base's folder, written first
    assert written["input_scale"] == 2.0 and written["finetune"]["scale"] == pytest.approx(2.0)
