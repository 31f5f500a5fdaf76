"""Annotated images for training: pairs of micrographs and instance masks, crops and augmentation."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..preprocess import normalise
from .targets import three_class_target

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


#: Frames of the shared data sets whose masks hold only part of their particles, as (set folder,
#: stem): trained on, they teach that unannotated particles are background; scored, every
#: unannotated particle counts as a false one. :func:`find_pairs` leaves them out.
PARTLY_ANNOTATED = {
    # 195 of about 2,500 spheres annotated, in one region (6% of the field is labelled, 72-89% in
    # every other frame); v5 found 2,575 particles there, F1 0.13, count ratio 13
    ("sem-silica", "A02-3"),
}


def find_pairs(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    """Image/mask pairs matched by file stem (masks: 16-bit instance labels, 0 = background),
    without the :data:`PARTLY_ANNOTATED` frames."""
    from ..io.images import IMAGE_SUFFIXES

    set_name = Path(images_dir).resolve().parent.name
    images = {p.stem: p for p in sorted(Path(images_dir).iterdir())
              if p.suffix.lower() in IMAGE_SUFFIXES and (set_name, p.stem) not in PARTLY_ANNOTATED}
    masks = {p.stem: p for p in sorted(Path(masks_dir).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    pairs = [(images[k], masks[k]) for k in sorted(images) if k in masks]
    if not pairs:
        raise InputError(images_dir, f"no image has a mask of the same name in {masks_dir}", "name each mask like its image")
    return pairs


def split_pairs(pairs: list, validation: float = 0.15, test: float = 0.15, seed: int = 0) -> dict[str, list]:
    """Image/mask pairs split into ``train``, ``validation`` and ``test`` by source (article,
    sample group, series; :func:`~.splits.source_groups` reads it from the images' folder), whole
    sources on each side (:func:`~.splits.split_by_source`). ``test`` is held out of training
    and of every choice made on validation images, for the final figures."""
    from .splits import source_groups, split_by_source

    if not pairs:
        return {"train": [], "validation": [], "test": []}
    by_stem = {p[0].stem: p for p in pairs}
    groups, _ = source_groups(Path(pairs[0][0]).parent, by_stem)
    return {part: [by_stem[s] for s in stems]
            for part, stems in split_by_source(groups, validation, test, seed).items()}


def split_validation(pairs: list, fraction: float = 0.15, test: float = 0.15) -> tuple[list, list]:
    """(training pairs, validation pairs) of :func:`split_pairs`: the test part is in neither."""
    parts = split_pairs(pairs, fraction, test)
    return parts["train"], parts["validation"]


def load_pair(image_path: Path, mask_path: Path, kind: str = "instances"):
    """(normalised image (H, W) float32, instance labels (H, W) int32).

    ``kind="foreground"``: the mask outlines groups of particles (agglomerates), not single ones;
    its foreground becomes -1, which :func:`~.targets.three_class_target` turns into
    "particle or border, not known which" (learnt as foreground; the separation is not)."""
    from ..io.images import read_micrograph
    from ..io.writers import read_labels

    if kind not in ("instances", "foreground"):
        raise ValueError(f"unknown mask kind {kind!r}; use 'instances' or 'foreground'")
    img = normalise(read_micrograph(image_path).pixels)
    labels, _ = read_labels(mask_path)
    if labels.shape != img.shape:
        raise InputError(mask_path, f"mask is {labels.shape} but image is {img.shape}", "masks must match their images")
    if kind == "foreground":
        labels = -(np.asarray(labels) > 0).astype(np.int32)
    return img, labels


def augmented_sample(aug, img: np.ndarray, labels: np.ndarray, border_width: int):
    """One augmented crop: (image (h, w) float32, 3-class target (h, w) int64). The target is made
    after scaling, so the border keeps its width in pixels at every scale."""
    out = aug(image=img, mask=labels.astype(np.int32))
    return out["image"].astype(np.float32), three_class_target(out["mask"], border_width).astype(np.int64)


def augmenter(crop: int, scale_range=(0.5, 2.0), focus_fraction: float = 0.0):
    """albumentations pipeline: scale, a crop of ``crop`` pixels, flips, rotations,
    elastic/grid/optical distortion, brightness/contrast, gamma, blur and noise.

    The crop is random; with probability ``focus_fraction`` it is instead placed so that it holds
    an annotated pixel (a random one, if the crop has any), as nnU-Net oversamples foreground. On a
    sparse frame (a dozen agglomerates of 10-30 px on a 1280x960 polymer surface, 0.3% of the
    field) nine random crops in ten hold no particle, and a network learns to call the whole
    surface substrate."""
    import albumentations as A
    import cv2

    # padding inside the crop: PadIfNeeded before it copied the whole scaled image even when
    # nothing was padded (same crops, 7.1 -> 1.4 ms for a 1024x768 frame's geometry)
    random_crop = A.RandomCrop(crop, crop, pad_if_needed=True, border_mode=cv2.BORDER_REFLECT_101)
    if focus_fraction > 0:
        # CropNonEmptyMaskIfExists needs an image at least as large as the crop: padded first
        focused = A.Sequential([A.PadIfNeeded(crop, crop, border_mode=cv2.BORDER_REFLECT_101),
                                A.CropNonEmptyMaskIfExists(crop, crop)], p=focus_fraction)
        random_crop.p = 1.0 - focus_fraction
        cropping = A.OneOf([random_crop, focused], p=1.0)
    else:
        cropping = random_crop
    return A.Compose([
        A.RandomScale(scale_limit=(scale_range[0] - 1, scale_range[1] - 1), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0),
        cropping,
        A.HorizontalFlip(), A.VerticalFlip(), A.RandomRotate90(),
        A.OneOf([A.ElasticTransform(alpha=20, sigma=5), A.GridDistortion(), A.OpticalDistortion()], p=0.2),
        A.RandomBrightnessContrast(0.2, 0.3, p=0.7),
        A.RandomGamma((70, 150), p=0.3),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.08))], p=0.4),
    ])


class PasteSource:
    """Seed 004's paste augmentation, online: agglomerates cut once from the *training* images
    (never from validation ones: pasting those would leak validation particles into training),
    pasted each time on a new empty SEM substrate.

    ``pieces[i]`` holds the agglomerates of training image i (outlines not touching its border,
    at least ``min_px`` pixels).
    """

    def __init__(self, train_data: list[tuple[np.ndarray, np.ndarray]], min_px: int = 30):
        from ..synth import cut_agglomerates

        self.pieces = [p for p in (cut_agglomerates(img, lab, min_px) for img, lab in train_data) if p]

    def __bool__(self) -> bool:
        return bool(self.pieces)

    def __getstate__(self) -> dict:
        """For spawned batch workers: the pieces' pixels travel as one :class:`SharedPairs` (in
        shared memory under torch's pickler: 155 MB of EMPS agglomerates became a handle), with
        the grouping and background levels beside it."""
        if getattr(self, "_shared", None) is None:
            flat = [(a.image, a.labels) for group in self.pieces for a in group]
            self._shared = SharedPairs(flat)
        return {"shared": self._shared, "counts": [len(group) for group in self.pieces],
                "levels": [a.background_level for group in self.pieces for a in group]}

    def __setstate__(self, state: dict) -> None:
        from ..synth import Agglomerate

        self._shared = state["shared"]
        flat = [Agglomerate(img, lab, level) for (img, lab), level in zip(self._shared, state["levels"])]
        ends = np.cumsum(state["counts"]).tolist()
        self.pieces = [flat[end - n:end] for n, end in zip(state["counts"], ends)]

    def sample(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """A (size, size) normalised image and its instance labels: 5-40 agglomerates from up to
        three training images, on a substrate at their background level with detector noise,
        the pasted outlines median-filtered (as ``emparticles synth --paste-images`` does)."""
        from ..synth import add_detector_noise, paste_agglomerates, render_substrate

        chosen = rng.choice(len(self.pieces), size=min(3, len(self.pieces)), replace=False)
        pieces = [a for k in chosen for a in self.pieces[int(k)]]
        level = float(np.median([a.background_level for a in pieces]))
        bg = np.clip(add_detector_noise(rng, render_substrate(rng, size, size, level)), 0, 1)
        img, labels = paste_agglomerates(rng, bg, pieces, int(rng.integers(5, 40)))
        return normalise(img), labels


class SharedPairs:
    """(image, labels) pairs packed into two flat tensors in shared memory.

    Batch-building workers are spawned processes, and everything their batch function holds is
    pickled to each of them at every epoch. As plain arrays, 308 EMPS images and 192 synthetic
    1024x768 frames pickle to 1.9 GB, 3-4 s per worker in the training process before the
    first batch, every epoch (``benchmarks/bench_batches.py``); torch's multiprocessing pickler
    sends a shared tensor as a handle, so the workers map these two instead of copying them.
    Indexing gives read-only numpy views: (image (H, W) float32, labels (H, W) int32).
    """

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]]):
        shapes = [img.shape for img, _ in pairs]
        if any(img.shape != lab.shape for img, lab in pairs):
            raise ValueError("every image and its labels must have the same shape")
        sizes = np.array([h * w for h, w in shapes], np.int64)
        self.shapes = shapes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.images = torch.empty(int(self.offsets[-1]), dtype=torch.float32)
        self.labels = torch.empty(int(self.offsets[-1]), dtype=torch.int32)
        images, labels = self.images.numpy(), self.labels.numpy()
        for k, (img, lab) in enumerate(pairs):
            images[self.offsets[k]:self.offsets[k + 1]] = np.asarray(img, np.float32).ravel()
            labels[self.offsets[k]:self.offsets[k + 1]] = np.asarray(lab, np.int32).ravel()
        self.images.share_memory_()
        self.labels.share_memory_()

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, k) -> tuple[np.ndarray, np.ndarray]:
        k = int(k)
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        k %= len(self)
        a, b = int(self.offsets[k]), int(self.offsets[k + 1])
        img, lab = self.images.numpy()[a:b].reshape(self.shapes[k]), self.labels.numpy()[a:b].reshape(self.shapes[k])
        img.flags.writeable = False
        lab.flags.writeable = False
        return img, lab

    def __iter__(self):
        return (self[k] for k in range(len(self)))


def training_sources(train_data: list, extra_images: str, extra_masks: str, extra_fraction: float,
                     paste_fraction: float, workers: int, log) -> tuple:
    """What a training run draws its crops from: (training pairs, extra pairs (e.g. synthetic SEM;
    empty without ``extra_images``), :class:`PasteSource` of the training images or None). With
    batch workers (``workers`` > 0) both sets of pairs are :class:`SharedPairs`."""
    extra_data: list = []
    if extra_images:
        extra_data = [load_pair(i, m) for i, m in find_pairs(Path(extra_images), Path(extra_masks))]
        log(f"{len(extra_data)} extra training images from {extra_images} ({extra_fraction:.0%} of crops)")
    paste = PasteSource(train_data) if paste_fraction > 0 else None
    if paste is not None:
        log(f"paste augmentation: agglomerates of {len(paste.pieces)} training images on empty backgrounds "
            f"({paste_fraction:.0%} of crops)")
    if workers > 0:  # spawned batch workers map the images instead of receiving copies
        return SharedPairs(train_data), (SharedPairs(extra_data) if extra_data else []), paste
    return train_data, extra_data, paste


def epoch_batches(make_batch: Callable[[np.random.Generator], object], steps: int, rng: np.random.Generator,
                  seed: int, epoch: int, workers: int = 0, pin_memory: bool = False) -> Iterator:
    """The ``steps`` batches of one training epoch, ``make_batch(rng)`` each.

    With ``workers`` > 0 they are built by that many processes, so that a GPU is not kept waiting
    for the augmentation; each worker draws from its own random stream (from ``seed``, ``epoch``
    and its number), and ``make_batch`` must be picklable (a module-level function or a
    ``functools.partial`` of one). The workers are spawned, not forked: a fork of a process whose
    thread pools (numba, OpenMP) have run can deadlock in the child. Without workers the batches
    are built here from ``rng``."""
    if workers <= 0:
        for _ in range(steps):
            yield make_batch(rng)
        return
    yield from torch.utils.data.DataLoader(_BatchStream(make_batch, steps, seed, epoch), batch_size=None,
                                           num_workers=workers, pin_memory=pin_memory, prefetch_factor=4,
                                           worker_init_fn=_one_thread, multiprocessing_context="spawn")


class BatchWorkers:
    """The batch-building processes of a whole training run, started once at ``first_epoch`` and
    kept for the epochs after it: starting ``workers`` spawned processes (each importing torch
    and receiving the batch function) at every epoch cost seconds per epoch that the GPU spent
    waiting. Epoch k's batches are those :func:`epoch_batches` gives for epoch k (same random
    streams per worker); epochs must be asked for in order, each consumed to its end."""

    def __init__(self, make_batch: Callable[[np.random.Generator], object], steps: int, seed: int,
                 first_epoch: int, workers: int, pin_memory: bool = False):
        if workers <= 0:
            raise ValueError("BatchWorkers needs at least one worker; build batches in-process with epoch_batches")
        self.next_epoch = first_epoch
        self._loader = torch.utils.data.DataLoader(
            _BatchStream(make_batch, steps, seed, first_epoch), batch_size=None, num_workers=workers,
            pin_memory=pin_memory, prefetch_factor=4, persistent_workers=True, worker_init_fn=_one_thread,
            multiprocessing_context="spawn")

    def epoch(self, epoch: int) -> Iterator:
        """The batches of ``epoch``, the epoch after the last one asked for."""
        if epoch != self.next_epoch:
            raise ValueError(f"epoch {epoch} asked for, but the workers are at epoch {self.next_epoch}")
        self.next_epoch += 1
        return iter(self._loader)


class TimedBatches:
    """Iterate over an epoch's batches and add up the seconds spent waiting for each one
    (``wait_s``): the share of an epoch the training process was kept waiting by the batch
    building, not by its own steps."""

    def __init__(self, batches):
        self._batches, self.wait_s = iter(batches), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self.wait_s += time.perf_counter() - t


def _one_thread(_worker: int) -> None:
    """Each batch-building worker computes on one thread (OpenCV would start one per core)."""
    import cv2

    cv2.setNumThreads(1)


class _BatchStream(torch.utils.data.IterableDataset):
    """One epoch of batches split among a DataLoader's workers."""

    def __init__(self, make_batch, steps: int, seed: int, epoch: int):
        super().__init__()
        self.make_batch, self.steps, self.seed, self.epoch = make_batch, steps, seed, epoch

    def __iter__(self):
        # each worker's copy counts its own epochs: a persistent worker is asked for one pass
        # per epoch (BatchWorkers), a fresh one for the single epoch it was started for
        epoch, self.epoch = self.epoch, self.epoch + 1
        info = torch.utils.data.get_worker_info()
        worker, n = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, epoch, worker])
        for _ in range(worker, self.steps, n):
            yield self.make_batch(rng)
