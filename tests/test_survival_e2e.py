"""Runs that survive, as a cluster job meets them, on each training script (real subprocesses, digits, CPU):

- preemption: the job's command line carries --resume auto from the start; SIGTERM / SIGUSR1 / SIGINT (Ctrl-C)
  mid-epoch leaves a mid-epoch checkpoint and exit status 0 (130 after Ctrl-C); resubmitting the SAME command
  continues and ends bitwise equal to a run that was never interrupted, with the same checkpoint files;
  resubmitting a finished run does nothing;
- divergence: a huge lr stops the run with exit status 3 and one line, and every checkpoint left is finite.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# 128 images, global batch 16: 8 steps per epoch, 2 epochs; a log line every step (the signal, sent at step 2,
# must land inside the epoch however fast the steps run)
TINY = ["--preset", "digits", "--train-subset", "128", "--batch-size", "16", "--epochs", "2", "--log-every", "1",
        "--save-every", "1", "--workers", "0"]
METHODS = {
    "simclr_nscl": (["simclr_nscl.py", "--proj-hidden", "32"], "model", signal.SIGINT),  # Ctrl-C: exit 130
    "resa": (["resa.py", "--proj-hidden", "32", "--emb-dim", "16"], "online", signal.SIGUSR1),
    "excb": (["excb.py", "--num-clusters", "8", "--n-local", "1", "--kmeans-samples", "64", "--proj-hidden", "32"],
             "student", signal.SIGTERM),
}


def _cmd(name, run_dir, *extra):
    script, *flags = METHODS[name][0]
    return [sys.executable, script, *TINY, *flags, "--output-dir", str(run_dir), *extra]


def _run(cmd):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _interrupted(cmd, sig, after_step=2):
    """Start the command, send `sig` once the log shows `after_step`, and wait for it to exit."""
    log = Path(cmd[cmd.index("--output-dir") + 1] + ".out")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 240
        while f"step {after_step}/" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=240)
    return proc.returncode, log.read_text()


# the default suite runs SimCLR (Ctrl-C); ExCB (SIGTERM) and ReSA (SIGUSR1) take the same path and run with -m slow
@pytest.mark.parametrize("name", ["simclr_nscl", pytest.param("resa", marks=pytest.mark.slow),
                                  pytest.param("excb", marks=pytest.mark.slow)])
def test_preempted_run_resumes_exactly_with_the_same_command(name, tmp_path):
    _, part, sig = METHODS[name]
    ref = _run(_cmd(name, tmp_path / "ref"))
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]

    job = _cmd(name, tmp_path / "job", "--resume", "auto")  # what a job script resubmits, unchanged
    code, log = _interrupted(job, sig)
    assert code == (130 if sig == signal.SIGINT else 0) and "Traceback" not in log, log[-3000:]
    assert "--resume auto: no checkpoint" in log and "stopped by a signal after step" in log
    mid = [p.name for p in common.list_checkpoints(tmp_path / "job") if "_step" in p.name]
    assert len(mid) == 1, log[-2000:]
    assert common.load_checkpoint(tmp_path / "job" / mid[0])["step"] % 8 != 0  # stopped mid-epoch

    again = _run(job)
    assert again.returncode == 0 and f"continuing from {tmp_path / 'job' / mid[0]}" in again.stdout, \
        again.stdout[-2000:] + again.stderr[-2000:]
    names = lambda d: sorted(p.name for p in Path(d).glob("*.pt"))  # noqa: E731
    assert names(tmp_path / "job") == names(tmp_path / "ref")  # the preemption checkpoint was superseded
    a = common.load_checkpoint(tmp_path / "ref" / "ckpt_epoch0002.pt")
    b = common.load_checkpoint(tmp_path / "job" / "ckpt_epoch0002.pt")
    assert a["step"] == b["step"] == 16 and a["precision"] == b["precision"] == "fp32"
    for k, v in a["train_state"][part].items():
        assert torch.equal(v, b["train_state"][part][k]), f"{k} differs after the preemption"
    if name == "simclr_nscl":  # a finished run resubmitted: nothing to do, nothing rewritten
        mtime = (tmp_path / "job" / "ckpt_epoch0002.pt").stat().st_mtime
        done = _run(job)
        assert done.returncode == 0 and "already finished its 2 epochs" in done.stdout
        assert (tmp_path / "job" / "ckpt_epoch0002.pt").stat().st_mtime == mtime


@pytest.mark.parametrize("name", ["simclr_nscl", "excb"])
def test_divergence_stops_before_any_bad_checkpoint(name, tmp_path):
    extra = ["--lr", "1e38", "--save-epoch0"] if name == "excb" else ["--lr", "1e38"]
    out = _run(_cmd(name, tmp_path / "run", *extra))
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the loss became") and "--lr" in last and "ckpt_epoch0000.pt" in last
    ckpts = common.list_checkpoints(tmp_path / "run")
    assert ckpts  # the epoch-0 checkpoint, written before training
    for path in ckpts:
        state = common.load_checkpoint(path)["train_state"]
        tensors = [v for part in state.values() if isinstance(part, dict) for v in part.values()
                   if isinstance(v, torch.Tensor) and v.is_floating_point()]
        assert tensors and all(torch.isfinite(t).all() for t in tensors), f"{path.name} holds non-finite values"


@pytest.mark.slow
def test_torchrun_forwards_sigterm_and_both_ranks_resume(tmp_path):
    """Under torchrun (2 gloo ranks) SIGTERM to the launcher reaches both workers; they stop after the same step,
    rank 0 saves, and the same command continues to the same final weights as an uninterrupted 2-rank run."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    base = lambda d: launch + _cmd("simclr_nscl", d, "--resume", "auto")[1:]  # noqa: E731
    assert _run(base(tmp_path / "ref")).returncode == 0
    _, log = _interrupted(base(tmp_path / "job"), signal.SIGTERM, after_step=2)
    assert "stopped by a signal after step" in log, log[-3000:]
    again = _run(base(tmp_path / "job"))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    a = common.load_checkpoint(tmp_path / "ref" / "ckpt_epoch0002.pt")["train_state"]["model"]
    b = common.load_checkpoint(tmp_path / "job" / "ckpt_epoch0002.pt")["train_state"]["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
