"""Training data on disk: image/mask folders, synthetic sets, and annotations from other tools.

A training set is two folders with matching file stems: ``images/`` (micrographs) and
``masks/`` (16-bit instance labels, 0 = background), which ``emparticles train`` reads.
Annotations made elsewhere come in as COCO instance JSON (CVAT, Label Studio, Roboflow, our own
``coco_instances.json``), labelme JSON (one file per image) or a VIA project/export, and leave as
COCO instance JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from .writers import _write, write_json, write_label_png


def write_training_pair(image: np.ndarray, labels: np.ndarray, out_dir: Path, name: str,
                        pixel_size_nm: float | None = None) -> tuple[Path, Path]:
    """Write ``images/<name>.tif`` (8-bit, ImageJ-calibrated in nm when ``pixel_size_nm`` is
    given) and ``masks/<name>.png`` (16-bit labels), each atomically."""
    import tifffile

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    kwargs: dict = {"imagej": True, "compression": "zlib"}
    if pixel_size_nm:
        kwargs["resolution"] = (1.0 / pixel_size_nm, 1.0 / pixel_size_nm)
        kwargs["metadata"] = {"unit": "nm"}
    img_path = _write(out_dir / "images" / f"{name}.tif", lambda p: tifffile.imwrite(p, image, **kwargs))
    mask_path = write_label_png(labels, out_dir / "masks" / f"{name}.png")
    return img_path, mask_path


def write_synth_set(out_dir: Path, count: int, seed: int = 0, settings=None, paste_from: tuple[Path, Path] | None = None,
                    paste_fraction: float = 0.0, overwrite: bool = False, progress=None) -> dict:
    """Write ``count`` synthetic SEM images with their masks into ``out_dir`` (images/, masks/,
    and ``synth.json`` with what each image drew).

    Image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so a set can be extended or
    finished after an interruption with the same files; existing pairs are kept unless
    ``overwrite``. With ``paste_from`` (an images folder and a masks folder), a ``paste_fraction``
    of the images are made by pasting annotated agglomerates on empty backgrounds instead.
    """
    from ..synth import (
        SynthSettings,
        add_detector_noise,
        cut_agglomerates,
        paste_agglomerates,
        render_substrate,
        synth_sem,
        to_uint8,
    )

    settings = settings or SynthSettings()
    out_dir = Path(out_dir)
    record_path = out_dir / "synth.json"
    record = json.loads(record_path.read_text()) if record_path.exists() and not overwrite else {}
    pairs = None
    if paste_from is not None and paste_fraction > 0:
        from ..train.data import find_pairs

        pairs = find_pairs(*paste_from)
    for i in range(count):
        name = f"synth_{seed:04d}_{i:05d}"
        if not overwrite and (out_dir / "images" / f"{name}.tif").exists() and (out_dir / "masks" / f"{name}.png").exists():
            if progress:
                progress()
            continue
        rng = np.random.default_rng([seed, i])
        if pairs and rng.random() < paste_fraction:
            from ..train.data import load_pair

            pieces, sources = [], []
            for k in rng.choice(len(pairs), size=min(3, len(pairs)), replace=False):
                img, lab = load_pair(*pairs[int(k)])
                pieces += cut_agglomerates(img, lab)
                sources.append(pairs[int(k)][0].name)
            if pieces:
                level = float(np.median([p.background_level for p in pieces]))
                bg = np.clip(add_detector_noise(rng, render_substrate(rng, settings.height, settings.width, level)), 0, 1)
                img, labels = paste_agglomerates(rng, bg, pieces, int(rng.integers(5, 40)))
                write_training_pair(to_uint8(rng, img), labels, out_dir, name)
                record[name] = {"kind": "paste", "sources": sources, "particles": int(labels.max())}
                write_json(record, record_path)
                if progress:
                    progress()
                continue
        s = synth_sem(rng, settings)
        write_training_pair(s.image, s.labels, out_dir, name, s.pixel_size_nm)
        record[name] = {"kind": "synth", "particles": int(s.labels.max()), "pixel_size_nm": s.pixel_size_nm,
                        "info_bar_rows": s.info_bar_rows, **s.params}
        write_json(record, record_path)
        if progress:
            progress()
    return record


# ------------------------------------------------------------------------------- annotations


def _polygon_labels(polygons: list[list[list[float]]], height: int, width: int) -> np.ndarray:
    """Instance labels from one polygon list per instance (COCO [x0, y0, x1, y1, ...] lists),
    rasterised by pycocotools like COCO tools do; larger instances are painted first, so where
    outlines overlap the smaller particle stays whole."""
    from pycocotools import mask as mask_utils

    masks = []
    for polys in polygons:
        polys = [p for p in polys if len(p) >= 6]
        if not polys:
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        masks.append(mask_utils.decode(rle).astype(bool))
    return _paint(masks, (height, width))


def _paint(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    from ..types import relabel_consecutive

    labels = np.zeros(shape, np.int32)
    for i in np.argsort([-int(m.sum()) for m in masks], kind="stable"):
        labels[masks[i]] = i + 1
    return relabel_consecutive(labels)


def read_coco_labels(path: Path) -> dict[str, np.ndarray]:
    """COCO instance annotations -> {image file name: (H, W) int32 labels}. Polygons, RLE and
    compressed RLE are all understood (pycocotools); crowd annotations are skipped."""
    from pycocotools import mask as mask_utils

    path = Path(path)
    try:
        data = json.loads(path.read_text())
        images = {im["id"]: im for im in data["images"]}
        anns = data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"is not COCO instance JSON ({exc})", "export the annotations as COCO 1.0 (instances)") from None
    per_image: dict[int, list[np.ndarray]] = {i: [] for i in images}
    for ann in anns:
        im = images.get(ann.get("image_id"))
        if im is None or ann.get("iscrowd", 0):
            continue
        h, w = int(im["height"]), int(im["width"])
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            polys = [p for p in seg if len(p) >= 6]
            if not polys:
                continue
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        elif isinstance(seg, dict) and "counts" in seg:
            rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else \
                {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]}
        else:
            continue
        per_image[im["id"]].append(mask_utils.decode(rle).astype(bool))
    return {images[i]["file_name"]: _paint(m, (int(images[i]["height"]), int(images[i]["width"])))
            for i, m in per_image.items()}


def read_labelme_labels(path: Path) -> dict[str, np.ndarray]:
    """A labelme JSON file (polygons, rectangles, circles) -> {imagePath: labels}."""
    path = Path(path)
    data = json.loads(path.read_text())
    h, w = int(data["imageHeight"]), int(data["imageWidth"])
    polygons = []
    for shape in data.get("shapes", []):
        pts = np.asarray(shape.get("points", []), float)
        kind = shape.get("shape_type", "polygon")
        if kind == "rectangle" and len(pts) == 2:
            (x0, y0), (x1, y1) = pts
            pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        elif kind == "circle" and len(pts) == 2:
            r = float(np.hypot(*(pts[1] - pts[0])))
            t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
            pts = np.stack([pts[0][0] + r * np.cos(t), pts[0][1] + r * np.sin(t)], 1)
        elif kind != "polygon":
            continue
        polygons.append([pts.ravel().tolist()])
    return {str(data.get("imagePath") or path.with_suffix(".png").name): _polygon_labels(polygons, h, w)}


def read_via_labels(path: Path, image_dir: Path | None = None) -> dict[str, np.ndarray]:
    """A VIA (VGG Image Annotator) 2.x JSON export -> {filename: labels}. VIA does not store image
    sizes, so the images are looked up in ``image_dir`` (default: the JSON file's folder)."""
    from PIL import Image

    path = Path(path)
    data = json.loads(path.read_text())
    entries = data.get("_via_img_metadata", data)
    out = {}
    for entry in entries.values():
        name = entry["filename"]
        img_path = Path(image_dir or path.parent) / name
        if not img_path.exists():
            raise InputError(img_path, "is named in the VIA file but not found (VIA does not store image sizes)",
                             "pass --images with the folder of the annotated images")
        with Image.open(img_path) as im:
            w, h = im.size
        polygons = []
        for region in entry.get("regions", []):
            a = region.get("shape_attributes", {})
            if a.get("name") in ("polygon", "polyline"):
                polygons.append([np.ravel(np.column_stack([a["all_points_x"], a["all_points_y"]])).tolist()])
            elif a.get("name") == "rect":
                x, y, rw, rh = a["x"], a["y"], a["width"], a["height"]
                polygons.append([[x, y, x + rw, y, x + rw, y + rh, x, y + rh]])
            elif a.get("name") in ("circle", "ellipse"):
                rx, ry = a.get("r", a.get("rx")), a.get("r", a.get("ry"))
                t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
                th = a.get("theta", 0.0)
                xs = a["cx"] + rx * np.cos(t) * np.cos(th) - ry * np.sin(t) * np.sin(th)
                ys = a["cy"] + rx * np.cos(t) * np.sin(th) + ry * np.sin(t) * np.cos(th)
                polygons.append([np.ravel(np.column_stack([xs, ys])).tolist()])
        out[name] = _polygon_labels(polygons, h, w)
    return out


def read_annotations(path: Path, image_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Instance labels from a COCO, labelme or VIA JSON file, by the keys it holds."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot be read as JSON ({exc})", "pass a COCO, labelme or VIA JSON export") from None
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return read_coco_labels(path)
    if isinstance(data, dict) and "shapes" in data and "imageHeight" in data:
        return read_labelme_labels(path)
    if isinstance(data, dict) and ("_via_img_metadata" in data or all(isinstance(v, dict) and "regions" in v for v in data.values())):
        return read_via_labels(path, image_dir)
    raise InputError(path, "is neither COCO instance JSON, labelme JSON nor a VIA export",
                     "export the annotations as COCO 1.0 (CVAT: Export dataset > COCO 1.0)")
