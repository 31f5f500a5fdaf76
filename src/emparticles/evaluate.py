"""Scoring predicted instances against ground truth (one-to-one matching at an IoU threshold)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class Matching:
    """Result of one-to-one matching of predicted to true particles at IoU >= ``thresh``."""

    thresh: float
    n_true: int
    n_pred: int
    tp: int
    mean_matched_iou: float

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_true - self.tp

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else (1.0 if self.n_true == 0 else 0.0)

    @property
    def recall(self) -> float:
        return self.tp / self.n_true if self.n_true else 1.0

    @property
    def f1(self) -> float:
        denom = self.tp + 0.5 * (self.fp + self.fn)
        return self.tp / denom if denom else 1.0

    @property
    def panoptic_quality(self) -> float:
        """Segmentation quality (mean IoU of matches) x recognition quality (F1)."""
        return self.mean_matched_iou * self.f1 if self.tp else (1.0 if self.n_true == self.n_pred == 0 else 0.0)


def iou_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(N_true, N_pred) IoU between every true and predicted label (labels 1..N, 0 = background)."""
    t = np.asarray(y_true, np.int64).ravel()
    p = np.asarray(y_pred, np.int64).ravel()
    nt, npred = int(t.max(initial=0)), int(p.max(initial=0))
    inter = np.bincount(t * (npred + 1) + p, minlength=(nt + 1) * (npred + 1)).reshape(nt + 1, npred + 1)
    area_t = inter.sum(axis=1)
    area_p = inter.sum(axis=0)
    union = area_t[:, None] + area_p[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou[1:, 1:]


def matching(y_true: np.ndarray, y_pred: np.ndarray, thresh: float = 0.5) -> Matching:
    """Match particles one-to-one (Hungarian on IoU) and count those with IoU >= ``thresh``.

    Both inputs are (H, W) label images; label ids need not be consecutive but must be >= 0.
    """
    from .types import relabel_consecutive

    yt, yp = relabel_consecutive(y_true), relabel_consecutive(y_pred)
    iou = iou_matrix(yt, yp)
    nt, npred = iou.shape
    if nt == 0 or npred == 0:
        return Matching(thresh, nt, npred, 0, 0.0)
    rows, cols = linear_sum_assignment(-iou)
    matched = iou[rows, cols]
    good = matched >= thresh
    tp = int(good.sum())
    return Matching(thresh, nt, npred, tp, float(matched[good].mean()) if tp else 0.0)
