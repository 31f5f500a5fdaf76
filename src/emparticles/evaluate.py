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


def overlaps(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(N_true + 1, N_pred + 1) pixel counts shared by every true and predicted label, row and
    column 0 for the background (labels 1..N, 0 = background)."""
    t = np.asarray(y_true, np.int64).ravel()
    p = np.asarray(y_pred, np.int64).ravel()
    nt, npred = int(t.max(initial=0)), int(p.max(initial=0))
    return np.bincount(t * (npred + 1) + p, minlength=(nt + 1) * (npred + 1)).reshape(nt + 1, npred + 1)


def _iou_from_overlaps(inter: np.ndarray) -> np.ndarray:
    """(N_true, N_pred) IoU from an :func:`overlaps` table."""
    union = inter.sum(axis=1)[:, None] + inter.sum(axis=0)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou[1:, 1:]


def iou_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(N_true, N_pred) IoU between every true and predicted label (labels 1..N, 0 = background)."""
    return _iou_from_overlaps(overlaps(y_true, y_pred))


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


def error_kinds(y_true: np.ndarray, y_pred: np.ndarray, thresh: float = 0.5) -> dict[str, int]:
    """What the unmatched particles of one image are, from two (H, W) label images (0 = background).

    A particle is matched when a particle of the other image overlaps it with IoU >= ``thresh``
    (>= 0.5 makes that pairing one-to-one, as in :func:`matching`). An unmatched true particle is
    ``missed`` when most of its pixels are background in the prediction, ``merged`` when the
    prediction holding most of it holds more than half of it and lies at least 20% on other true
    particles, ``split`` when no prediction holds more than half of it, else ``other`` (a badly
    drawn outline). An unmatched prediction is ``false`` when it lies mostly on background,
    ``merging`` when two or more true particles each take at least 20% of it, ``fragment`` when it
    holds at most half of every true particle it touches, else ``other``.

    Returns counts: true, pred, matched, true_missed, true_merged, true_split, true_other,
    pred_false, pred_merging, pred_fragment, pred_other.
    """
    from .types import relabel_consecutive

    inter = overlaps(relabel_consecutive(y_true), relabel_consecutive(y_pred))
    nt, npred = inter.shape[0] - 1, inter.shape[1] - 1
    iou = _iou_from_overlaps(inter)
    of_true = inter / np.maximum(inter.sum(axis=1), 1)[:, None]  # share of each true particle in each prediction
    of_pred = inter / np.maximum(inter.sum(axis=0), 1)[None, :]  # share of each prediction on each true particle
    out = dict.fromkeys(["true_missed", "true_merged", "true_split", "true_other",
                         "pred_false", "pred_merging", "pred_fragment", "pred_other"], 0)
    matched_t = (iou >= thresh).any(axis=1) if npred else np.zeros(nt, bool)
    matched_p = (iou >= thresh).any(axis=0) if nt else np.zeros(npred, bool)
    for i in np.nonzero(~matched_t)[0] + 1:
        if of_true[i, 0] > 0.5:
            out["true_missed"] += 1
            continue
        j = 1 + int(np.argmax(inter[i, 1:])) if npred else 0
        if j and of_true[i, j] > 0.5 and 1 - of_pred[0, j] - of_pred[i, j] >= 0.2:
            out["true_merged"] += 1
        elif not j or of_true[i, j] <= 0.5:
            out["true_split"] += 1
        else:
            out["true_other"] += 1
    for j in np.nonzero(~matched_p)[0] + 1:
        if of_pred[0, j] > 0.5:
            out["pred_false"] += 1
        elif (of_pred[1:, j] >= 0.2).sum() >= 2:
            out["pred_merging"] += 1
        elif of_true[1:, j].max(initial=0) <= 0.5:
            out["pred_fragment"] += 1
        else:
            out["pred_other"] += 1
    return {"true": nt, "pred": npred, "matched": int(matched_t.sum()), **out}


# ------------------------------------------------------------------------- dataset-level scores
def semantic_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Foreground pixel accuracy, IoU and Dice of two label images (any particle vs background)."""
    t, p = np.asarray(y_true) > 0, np.asarray(y_pred) > 0
    inter, union = int((t & p).sum()), int((t | p).sum())
    total = int(t.sum() + p.sum())
    return {"pixel_accuracy": float((t == p).mean()), "foreground_iou": inter / union if union else 1.0,
            "foreground_dice": 2 * inter / total if total else 1.0}


def matched_dice(y_true: np.ndarray, y_pred: np.ndarray, thresh: float = 0.5) -> float:
    """Mean Dice of the particle pairs matched one-to-one at IoU >= ``thresh``."""
    from .types import relabel_consecutive

    iou = iou_matrix(relabel_consecutive(y_true), relabel_consecutive(y_pred))
    if iou.size == 0:
        return float("nan")
    rows, cols = linear_sum_assignment(-iou)
    good = iou[rows, cols] >= thresh
    iou_m = iou[rows, cols][good]
    return float(np.mean(2 * iou_m / (1 + iou_m))) if iou_m.size else float("nan")


def voc_ap50(gts: list[np.ndarray], preds: list[np.ndarray], scores: list[np.ndarray]) -> float:
    """PASCAL VOC 11-point average precision at IoU 0.5 over a set of images: predictions ranked by
    score across images, each matched greedily to the best unmatched true particle."""
    from .types import relabel_consecutive

    records, n_true = [], 0
    for gt, pred, sc in zip(gts, preds, scores):
        gt, pred = relabel_consecutive(gt), relabel_consecutive(pred)
        iou = iou_matrix(gt, pred)
        n_true += iou.shape[0]
        for j in range(iou.shape[1]):
            records.append((float(sc[j]) if j < len(sc) else 0.0, len(records), iou[:, j], id(iou)))
    if n_true == 0:
        return float("nan")
    records.sort(key=lambda r: -r[0])
    taken: dict[int, np.ndarray] = {}
    tp = np.zeros(len(records))
    for k, (_, _, col, key) in enumerate(records):
        used = taken.setdefault(key, np.zeros(col.shape[0], bool))
        cand = np.where(~used, col, -1.0)
        if cand.size and cand.max() >= 0.5:
            used[int(np.argmax(cand))] = True
            tp[k] = 1
    ctp = np.cumsum(tp)
    recall = ctp / n_true
    precision = ctp / np.arange(1, len(tp) + 1)
    return float(np.mean([precision[recall >= r].max() if (recall >= r).any() else 0.0 for r in np.linspace(0, 1, 11)]))


def coco_ap(gts: list[np.ndarray], preds: list[np.ndarray], scores: list[np.ndarray]) -> dict:
    """COCO mask AP, AP50 and AP75 (pycocotools), up to 3000 detections per image."""
    import contextlib
    import io as _io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from .io.exports import coco_instances

    names = [f"img{i}" for i in range(len(gts))]
    gt_dict = coco_instances(dict(zip(names, gts)))
    if not gt_dict["annotations"]:
        return {"ap": float("nan"), "ap50": float("nan"), "ap75": float("nan")}
    pred_dict = coco_instances(dict(zip(names, preds)), dict(zip(names, scores)))
    results = [{"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"],
                "score": a.get("score", 1.0)} for a in pred_dict["annotations"]]
    with contextlib.redirect_stdout(_io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        if not results:
            return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.maxDets = [10, 100, 3000]
        ev.evaluate()
        ev.accumulate()
    # precision[T, R, K, A, M]: IoU thresholds, recall points, class, area range 'all', 3000 detections.
    # (COCOeval.summarize() would report AP at 100 detections, too few for particle images.)
    prec = ev.eval["precision"][:, :, 0, 0, -1]

    def mean_valid(a):
        a = a[a > -1]
        return float(a.mean()) if a.size else float("nan")

    return {"ap": mean_valid(prec), "ap50": mean_valid(prec[0]), "ap75": mean_valid(prec[5])}


def size_agreement(true_ecd: np.ndarray, pred_ecd: np.ndarray) -> dict:
    """Relative errors of D10/D50/D90 of ECD (Hazen quantiles), KS statistic and count ratio."""
    from scipy import stats as sst

    from .stats.distribution import weighted_quantile

    if len(true_ecd) == 0 or len(pred_ecd) == 0:
        return {"count_ratio": len(pred_ecd) / len(true_ecd) if len(true_ecd) else float("nan"),
                "d10_rel_error": float("nan"), "d50_rel_error": float("nan"), "d90_rel_error": float("nan"),
                "ks_statistic": float("nan")}
    qt = weighted_quantile(true_ecd, [0.1, 0.5, 0.9])
    qp = weighted_quantile(pred_ecd, [0.1, 0.5, 0.9])
    rel = (qp - qt) / qt
    return {"count_ratio": len(pred_ecd) / len(true_ecd), "d10_rel_error": float(rel[0]),
            "d50_rel_error": float(rel[1]), "d90_rel_error": float(rel[2]),
            "ks_statistic": float(sst.ks_2samp(true_ecd, pred_ecd).statistic)}


def label_size_agreement(gts, preds) -> dict:
    """:func:`size_agreement` of the ECDs of every particle of true and predicted label images
    (pairs of lists; labels < 1 and empty images carry no particle)."""
    from .measure import measure_labels

    def ecds(images) -> np.ndarray:
        return np.concatenate([measure_labels(x)["ecd_px"].to_numpy() for x in images if x.max() > 0] or [np.zeros(0)])

    return size_agreement(ecds(gts), ecds(preds))


def evaluate_dataset(gts: list[np.ndarray], preds: list[np.ndarray], scores: list[np.ndarray] | None = None) -> dict:
    """Every metric over a set of images: pooled matching at IoU 0.5 and averaged over 0.5:0.95
    (precision, recall, F1, panoptic quality), semantic scores, COCO and VOC AP, matched-pair
    Dice, and size-distribution agreement of the ECD."""

    if scores is None:
        scores = [np.ones(int(p.max()) if p.size else 0) for p in preds]
    out: dict = {"images": len(gts)}
    per_thresh = {}
    for thresh in np.round(np.arange(0.5, 0.96, 0.05), 2):
        ms = [matching(t, p, float(thresh)) for t, p in zip(gts, preds)]
        tp, nt, npred = sum(m.tp for m in ms), sum(m.n_true for m in ms), sum(m.n_pred for m in ms)
        iou_sum = sum(m.mean_matched_iou * m.tp for m in ms)
        f1 = 2 * tp / (nt + npred) if nt + npred else 1.0
        sq = iou_sum / tp if tp else 0.0
        per_thresh[float(thresh)] = {"precision": tp / npred if npred else 0.0, "recall": tp / nt if nt else 0.0,
                                     "f1": f1, "panoptic_quality": sq * f1}
    out.update({f"{k}_iou50": v for k, v in per_thresh[0.5].items()})
    out.update({f"{k}_iou50_95": float(np.mean([d[k] for d in per_thresh.values()])) for k in ("precision", "recall", "f1", "panoptic_quality")})
    t_all, p_all = np.concatenate([g.ravel() for g in gts]), np.concatenate([p.ravel() for p in preds])
    out.update(semantic_scores(t_all, p_all))
    out["matched_dice"] = float(np.nanmean([matched_dice(t, p) for t, p in zip(gts, preds)]))
    out.update({f"coco_{k}": v for k, v in coco_ap(gts, preds, scores).items()})
    out["voc_ap50_11pt"] = voc_ap50(gts, preds, scores)
    out.update(label_size_agreement(gts, preds))
    return out
