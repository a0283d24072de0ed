"""common.py's survival kit, piece by piece: one-line batch-size errors, --resume PATH|auto, checkpoint order and
pruning, the divergence guard, the preemption signal (1 and 2 gloo ranks) and unreadable images. The same pieces
inside the training scripts, end to end: tests/test_survival_e2e.py."""
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
from _dist import spawn

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- batch size


@pytest.mark.parametrize("batch, world, words", [
    (0, 1, r"--batch-size 0 must be a positive multiple of the 1 ranks .*e\.g\. --batch-size 1\)"),
    (-1, 1, r"--batch-size -1 must .*e\.g\. --batch-size 1\)"),
    (1, 2, r"--batch-size 1 must be a positive multiple of the 2 ranks .*e\.g\. --batch-size 2\)"),
    (6, 4, r"--batch-size 6 must .*e\.g\. --batch-size 4\)")])
def test_bad_batch_sizes_are_one_line_usage_errors(batch, world, words):
    with pytest.raises(common.UsageError, match=words):
        common.split_batch(batch, world)
    assert common.split_batch(8, 4) == 2


# a real interpreter for one script (every script's flags: tests/test_errors_flags.py, in-process)
@pytest.mark.parametrize("script", ["simclr_nscl.py", pytest.param("resa.py", marks=pytest.mark.slow),
                                    pytest.param("excb.py", marks=pytest.mark.slow)])
def test_batch_size_zero_on_every_script(script):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, script, "--preset", "digits", "--batch-size", "0", "--output-dir",
                          "/nonexistent/never"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [  # the Args field's range, before any work
        f"error: argument --batch-size: 0 is not in [1, inf) (see python {script} --help)"]


# ------------------------------------------------------------------------------------------- resume


@dataclasses.dataclass
class _Args:
    lr: float = 0.1
    epochs: int = 4
    workers: int = 0
    output_dir: str = ""
    resume: str = ""


def _write(run_dir, epoch, step=None, args=None, method="toy"):
    args = args or _Args(output_dir=str(run_dir))
    ckpt = common.make_checkpoint(method, epoch, step if step is not None else 10 * epoch, args,
                                  common.backbone_spec("convnet", 16), nn.Linear(2, 2), "online",
                                  common.dataset_info("digits"), {"w": torch.full((2,), float(epoch))})
    return common.save_checkpoint(Path(run_dir) / common.checkpoint_name(epoch, step), ckpt)


def test_checkpoint_names_sort_in_training_order(tmp_path):
    for e, st in [(10, None), (2, None), (1, 17), (1, None), (0, None)]:
        _write(tmp_path, e, st)
    assert [p.name for p in common.list_checkpoints(tmp_path)] == [
        "ckpt_epoch0000.pt", "ckpt_epoch0001.pt", "ckpt_epoch0001_step000017.pt", "ckpt_epoch0002.pt",
        "ckpt_epoch0010.pt"]
    common.prune_interrupted(tmp_path, 20)  # a later checkpoint supersedes the preemption one
    assert "ckpt_epoch0001_step000017.pt" not in {p.name for p in tmp_path.iterdir()}
    assert len(common.list_checkpoints(tmp_path)) == 4


def test_resume_auto_empty_partial_finished_and_other_configs(tmp_path, capsys):
    run = tmp_path / "run"
    args = _Args(output_dir=str(run), resume="auto")
    assert common.resume_checkpoint(args, "toy") is None                      # empty: start fresh
    _write(run, 1), _write(run, 2, 25)
    assert common.resume_checkpoint(args, "toy")["step"] == 25                # partial: the newest file
    (run / common.checkpoint_name(3)).write_bytes(b"truncated by a crash")    # damaged newest: skipped
    (run / common.checkpoint_name(2, 30)).write_bytes(b"")                    # zero bytes: skipped too
    capsys.readouterr()
    assert common.resume_checkpoint(args, "toy")["step"] == 25
    out = capsys.readouterr().out.splitlines()
    skipped = [line.split()[2].rstrip(":") for line in out if line.startswith("note: skipping")]
    assert skipped == ["ckpt_epoch0003.pt", "ckpt_epoch0002_step000030.pt"]   # each with a note, newest first
    _write(run, 4)
    assert common.resume_checkpoint(args, "toy")["epoch"] == 4                # finished: nothing left to do
    with pytest.raises(common.UsageError, match=r"--lr: 0.1 in the run, 0.5 now"):
        common.resume_checkpoint(_Args(lr=0.5, output_dir=str(run), resume="auto"), "toy")
    assert common.resume_checkpoint(_Args(workers=8, output_dir=str(run), resume="auto"), "toy")  # may differ
    with pytest.raises(common.CheckpointError, match="resume it with toy.py"):
        common.resume_checkpoint(args, "excb")
    with pytest.raises(common.UsageError, match="already holds checkpoints"):  # a fresh start never overwrites
        common.resume_checkpoint(_Args(output_dir=str(run)), "toy")
    explicit = _Args(lr=0.5, output_dir=str(tmp_path / "new"), resume=str(run / "ckpt_epoch0001.pt"))
    assert common.resume_checkpoint(explicit, "toy")["epoch"] == 1            # PATH: a deliberate change


# ------------------------------------------------------------------------------------------- divergence


def test_divergence_guard_reports_the_first_non_finite_step_and_the_last_good_checkpoint(tmp_path):
    _write(tmp_path, 1)
    guard = common.DivergenceGuard(torch.device("cpu"), 10, 40, lambda t: 0.5 * t, tmp_path)
    for step, loss in enumerate([1.0, 0.9, float("inf"), float("nan"), 0.3], start=11):
        guard.update(torch.tensor(loss), step)
    with pytest.raises(common.DivergenceError) as e:
        guard.check()
    msg = str(e.value)
    assert "became inf at step 13/40 (ep 1, lr 6)" in msg and "ckpt_epoch0001.pt" in msg and "--lr" in msg
    quiet = common.DivergenceGuard(torch.device("cpu"), 10, 40, lambda t: 0.1, tmp_path)
    quiet.update(torch.tensor(2.0), 1)
    quiet.check()  # finite losses: nothing happens


def _guard_on_two_ranks(rank, world):
    guard = common.DivergenceGuard(torch.device("cpu"), 5, 20, lambda t: 0.1, "/nonexistent")
    for step in range(1, 8):  # rank 1 diverges at step 6, rank 0 at step 4
        bad = step >= (4 if rank == 0 else 6)
        guard.update(torch.tensor(float("nan") if bad else 1.0), step)
    try:
        guard.check()
    except common.DivergenceError as e:
        return str(e)
    return None


def test_divergence_guard_agrees_over_ranks():
    msgs = spawn(_guard_on_two_ranks, 2)
    assert all(m is not None and "at step 4/20" in m for m in msgs)  # both stop, at the earliest bad step


# ------------------------------------------------------------------------------------------- preemption


def test_stop_signal_on_one_process_and_handler_restored():
    before = signal.getsignal(signal.SIGUSR1)
    stop = common.StopSignal(common.DistInfo())
    assert not stop() and not stop.stopping
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop() and stop.stopping and stop.received == "SIGUSR1"
    stop.close()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_ctrl_c_stops_like_sigterm_then_exits_130_and_a_second_one_interrupts(capsys):
    before = signal.getsignal(signal.SIGINT)
    stop = common.StopSignal(common.DistInfo())

    def main():  # a training loop: Ctrl-C during a step, the step finishes, the loop saves and returns
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and stop.received == common.StopSignal.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the step
            os.kill(os.getpid(), signal.SIGINT)
        stop.close()

    with pytest.raises(SystemExit) as e:
        common.run(main)
    assert e.value.code == 130 and signal.getsignal(signal.SIGINT) is before
    assert "received SIGINT: finishing this step, then saving a checkpoint" in capsys.readouterr().err
    common.StopSignal(common.DistInfo()).close()  # a new run starts with no signal recorded
    assert common.StopSignal.received is None
    common.run(lambda: None)  # SIGTERM / SIGUSR1 / no signal: main's normal return, exit status 0


def _stop_on_two_ranks(rank, world):
    stop = common.StopSignal(common.DistInfo(rank, world, rank, torch.device("cpu"), True))
    decisions = []
    for call in range(8):
        if rank == 1 and call == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is told, mid-run
        decisions.append(stop())
        if decisions[-1]:
            break
    stop.close()
    return decisions


def test_stop_signal_makes_every_rank_stop_after_the_same_step():
    a, b = spawn(_stop_on_two_ranks, 2)
    assert a == b == [False] * 4 + [True]  # one step after the first rank got the signal, on both ranks


# ------------------------------------------------------------------------------------------- bad images


def _image_folder(root, classes=2, per_class=6, size=16):
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root


def _spoil(root):
    good = (root / "train/class0/2.jpg").read_bytes()
    (root / "train/class0/2.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (root / "train/class1/4.jpg").write_text("not an image")           # a text file named .jpg


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_images_name_the_file_or_are_skipped_and_counted(tmp_path, workers):
    root = _image_folder(tmp_path)
    _spoil(root)
    aug = common.Augment(16, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = common.build_dataset("imagefolder", "train", aug, str(root), image_size=16)
    loader = common.build_loader(ds, 4, common.DistInfo(), workers=workers)
    loader.set_epoch(0)
    with pytest.raises(common.BadImageError, match=r"cannot read image .*class[01]/[24]\.jpg .*while scanning "
                                                   r".*train.*--skip-bad-images"):
        list(loader)
    ds = common.build_dataset("imagefolder", "train", aug, str(root), image_size=16, skip_bad=True)
    loader = common.build_loader(ds, 4, common.DistInfo(), workers=workers)
    loader.set_epoch(0)
    batches = list(loader)
    assert sum(len(y) for _, y in batches) == 12 and loader.skipped_images == 2
    first = ds.load(2)  # the truncated class0/2.jpg -> the next image (class0/3.jpg), with its own label
    assert first[1:] == (0, 1) and ds.load(3)[2] == 0


def test_empty_class_folder_and_empty_folder_say_so(tmp_path):
    root = _image_folder(tmp_path / "a")
    (root / "train" / "class9").mkdir()
    with pytest.raises(common.DatasetNotFoundError, match="holds no usable images.*class9"):
        common.build_dataset("imagefolder", "train", data_dir=str(root))
    (tmp_path / "b" / "train").mkdir(parents=True)
    with pytest.raises(common.DatasetNotFoundError, match="holds no usable images"):
        common.build_dataset("imagefolder", "train", data_dir=str(tmp_path / "b"))


def test_a_script_stops_on_a_bad_image_with_one_line(tmp_path):
    root = _image_folder(tmp_path / "data", per_class=8)
    _spoil(root)
    cmd = [sys.executable, "simclr_nscl.py", "--dataset", "imagefolder", "--data-dir", str(root), "--image-size",
           "16", "--backbone", "convnet", "--width", "1", "--proj-hidden", "32", "--epochs", "1", "--batch-size",
           "8", "--workers", "1", "--output-dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]  # a run-time failure
    assert out.stderr.strip().splitlines()[-1].startswith("error: cannot read image ")
    out = subprocess.run(cmd[:-1] + [str(tmp_path / "run2"), "--skip-bad-images"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "warning: skipped" in out.stderr
