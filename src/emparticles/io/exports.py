"""Exports for other tools: Parquet tables, COCO instance JSON, ImageJ ROI sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..measure import particle_outlines
from .writers import _write, write_json


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    """The particle table as Parquet (pyarrow), typed and compact."""
    return _write(path, lambda p: df.to_parquet(p, index=False))


def coco_instances(labels_by_image: dict[str, np.ndarray], scores_by_image: dict[str, np.ndarray] | None = None) -> dict:
    """COCO instance-segmentation dict: one image entry per label image, one annotation per
    particle with an RLE mask, its area, [x, y, w, h] bounding box and its score."""
    from pycocotools import mask as mask_utils

    images, annotations = [], []
    ann_id = 1
    for image_id, (name, labels) in enumerate(labels_by_image.items(), start=1):
        h, w = labels.shape
        images.append({"id": image_id, "file_name": name, "width": int(w), "height": int(h)})
        scores = None if scores_by_image is None else scores_by_image.get(name)
        for label in np.unique(labels[labels > 0]):
            m = np.asfortranarray((labels == label).astype(np.uint8))
            rle = mask_utils.encode(m)
            x, y, bw, bh = mask_utils.toBbox(rle).tolist()
            ann = {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                   "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                   "area": float(mask_utils.area(rle)), "bbox": [x, y, bw, bh], "particle_label": int(label)}
            if scores is not None and label - 1 < len(scores):
                ann["score"] = float(scores[label - 1])
            annotations.append(ann)
            ann_id += 1
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "particle", "supercategory": "particle"}]}


def write_coco(labels_by_image, path: Path, scores_by_image=None) -> Path:
    return write_json(coco_instances(labels_by_image, scores_by_image), path)


def write_imagej_rois(labels: np.ndarray, path: Path, only: set[int] | None = None) -> Path:
    """ImageJ ROI set (.zip) of traced particle outlines, named by particle label, which Fiji's
    ROI Manager opens for checking and correcting."""
    import roifile

    rois = []
    for label, pts in particle_outlines(labels).items():
        if only is not None and label not in only:
            continue
        roi = roifile.ImagejRoi.frompoints(pts.astype(np.float64), name=f"{label:05d}")
        roi.roitype = roifile.ROI_TYPE.TRACED
        rois.append(roi)

    def writer(p: Path) -> None:
        if rois:
            roifile.roiwrite(p, rois, mode="w")
        else:  # an empty but valid zip
            import zipfile

            zipfile.ZipFile(p, "w").close()

    return _write(path, writer)
