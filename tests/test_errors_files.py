"""File-system failures of the training scripts (issue 21): a regular file in the output path, a read-only and a
full disk. Each case: exit status 1, ONE `error:` line naming the path and what to do, no traceback, and the
checkpoints already there byte-for-byte unchanged. Real mounts (a read-only bind mount, a tiny tmpfs) need root;
without it those cases are skipped with the reason."""
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 128 images, global batch 32: 4 steps per epoch; a checkpoint after every epoch (SimCLR also at epoch 0)
TINY = ["simclr_nscl.py", "--preset", "digits", "--train-subset", "128", "--batch-size", "32", "--proj-hidden",
        "32", "--save-every", "1", "--workers", "0"]


def _run(*argv):
    return subprocess.run([sys.executable, *TINY, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def _one_error_line(out, *names):
    """Exit 1, no traceback, and the last stderr line is one `error:` line holding every name."""
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(n in line for n in names), line
    return line


@contextlib.contextmanager
def _mount(*args):
    """mount ARGS... for the test's duration, or skip the test where mounting is not allowed (not root)."""
    target = Path(args[-1])
    target.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", *args], capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only / tiny file system needs root here")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in Path(folder).glob("*.pt")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-epoch run stopped after its first epoch: ckpt_epoch0000.pt and ckpt_epoch0001.pt (epoch 2 deleted)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    out = _run("--epochs", "2", "--output-dir", run_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir / "ckpt_epoch0002.pt").unlink()
    return run_dir


def test_a_regular_file_in_the_output_path(tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    _one_error_line(_run("--epochs", "1", "--output-dir", tmp_path / "notes.txt" / "run"),
                    str(tmp_path / "notes.txt" / "run"), "regular file")


def test_a_read_only_output_directory_fails_before_any_work(tmp_path, finished):
    src = tmp_path / "src"
    shutil.copytree(finished, src)
    before = _snapshot(src)
    with _mount("--bind", "-o", "ro", str(src), str(tmp_path / "ro")) as ro:
        out = _run("--epochs", "2", "--output-dir", ro, "--resume", "auto")
        _one_error_line(out, str(ro), "read-only", "--output-dir")
        assert "data path" not in out.stdout  # stopped before the data was even loaded
    assert _snapshot(src) == before


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, finished):
    with _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(tmp_path / "disk")) as disk:
        run_dir = disk / "run"
        shutil.copytree(finished, run_dir)
        before = _snapshot(run_dir)
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * max(free - 64 * 1024, 0))  # leave 64 KiB: less than a checkpoint
        out = _run("--epochs", "2", "--output-dir", run_dir, "--resume", "auto")
        _one_error_line(out, str(run_dir), "disk is full")
        assert _snapshot(run_dir) == before  # the epoch-1 checkpoint survives, no partial epoch-2 file
        assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_resuming_into_a_model_the_checkpoint_does_not_fit_is_one_line(tmp_path, finished):
    ckpt = finished / "ckpt_epoch0001.pt"
    before = ckpt.read_bytes()
    out = _run("--epochs", "2", "--proj-hidden", "64", "--output-dir", tmp_path / "r", "--resume", ckpt)
    _one_error_line(out, str(ckpt), "model", "--proj-hidden: 32 in the run, 64 now")
    assert ckpt.read_bytes() == before
