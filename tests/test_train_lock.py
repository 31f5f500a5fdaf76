"""One training process per run folder."""

import os
import subprocess
import sys

import pytest

from emparticles.errors import InputError
from emparticles.train.lock import LOCK_FILE, run_folder_lock


def test_second_trainer_is_refused_while_the_first_runs(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK_FILE).write_text(f"{other.pid}\n")
        with pytest.raises(InputError) as err:
            with run_folder_lock(tmp_path):
                pass
        assert str(other.pid) in str(err.value) and str(tmp_path) in str(err.value)
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(other.pid)  # its lock is left alone
    finally:
        other.kill()
        other.wait()


def test_lock_is_held_then_released_and_stale_locks_are_taken_over(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (tmp_path / LOCK_FILE).write_text(f"{ended.pid}\n")  # its process has ended
    with run_folder_lock(tmp_path) as path:
        assert path.read_text().strip() == str(os.getpid())
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(RuntimeError):
        with run_folder_lock(tmp_path):
            raise RuntimeError("training failed")
    assert not (tmp_path / LOCK_FILE).exists()  # released on errors too
