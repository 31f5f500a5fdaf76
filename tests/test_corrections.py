"""Editing particles by hand: delete, merge, split, on hand-built label images."""

from __future__ import annotations

import numpy as np

from emparticles.corrections import (
    delete_particles,
    merge_particles,
    new_particle_id,
    split_particle,
)


def test_editing_functions_on_hand_built_labels():
    lab = np.zeros((20, 30), np.int32)
    lab[2:8, 2:8] = 1
    lab[2:8, 9:15] = 2  # one background column between 1 and 2
    lab[12:18, 2:28] = 5
    assert set(np.unique(delete_particles(lab, [2]))) == {0, 1, 5}
    merged = merge_particles(lab, [2, 1])
    assert set(np.unique(merged)) == {0, 1, 5} and merged[4, 8] == 1  # the seam is filled
    assert (merged == 1).sum() == 36 + 36 + 6
    split = split_particle(lab, 5, np.array([[10, 15], [20, 15]]))
    assert set(np.unique(split)) == {0, 1, 2, 5, 6}
    assert (split == 5).sum() + (split == 6).sum() == (lab == 5).sum() - 2 * 6  # a 2-px cut
    assert (split[lab != 5] == lab[lab != 5]).all()  # other particles keep their ids
    assert np.array_equal(split_particle(lab, 1, np.array([[0, 25], [1, 29]])), lab)  # a line that misses
    assert new_particle_id(lab) == 6
