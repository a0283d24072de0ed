"""monitor.py and the analyze subcommands on everyday mistakes (issue 21): a read-only run directory, a full disk,
damaged or empty checkpoints among good ones, bad flags. Each case: the exit status, one `error:` line naming what
is wrong (no traceback), and the checkpoints and a previous monitor.csv byte-for-byte unchanged. In-process
through common.run (a string passed to sys.exit is what the interpreter prints, with status 1)."""
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import excb  # noqa: E402
import monitor  # noqa: E402
import resa  # noqa: E402
from test_monitor_cli import make_run, read  # noqa: E402  (the same fake run as monitor.py's tests)

# the cheapest full monitor run: 100 images, no LiDAR, no augmented views, no probe
TINY = ["--max-samples", "100", "--silhouette-samples", "100", "--lidar-images", "0", "--entropy", "gaussian",
        "--pairing", "seeds", "--probe", "none", "--kmeans-n-init", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "fake_digits", epochs=(0, 2, 4))


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())
            if p.is_file()}


def status(fn, capsys):
    """-> (exit status, stderr, stdout) of fn() run as a script's main (common.run), as the interpreter ends it."""
    with pytest.raises(SystemExit) as e:
        common.run(fn)
        sys.exit(0)
    out = capsys.readouterr()
    code = e.value.code
    err = out.err + (f"{code}\n" if isinstance(code, str) else "")
    return (1 if isinstance(code, str) else code or 0), err, out.out


def one_line(err, *names):
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for name in names:
        assert name in err, (name, err)


@pytest.fixture
def mount(tmp_path):
    """mount(args, target): a real mount (read-only bind, tiny tmpfs), undone at the end; skips if not allowed."""
    done = []

    def do(args, target):
        target.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"mounting is not permitted here ({proc.stderr.strip()[:80]})")
        done.append(target)
        return target
    yield do
    for target in reversed(done):
        subprocess.run(["umount", "-l", str(target)], check=False)


# ---- the file system ----------------------------------------------------------------------------------------

def test_read_only_run_dir(run_dir, tmp_path, mount, capsys):
    src = tmp_path / "src"
    shutil.copytree(run_dir, src)
    (src / "monitor.csv").write_text("previous\n")
    ro = mount(["--bind", "-o", "ro", str(src)], tmp_path / "fake_digits")
    before = digest(ro)
    code, err, out = status(lambda: monitor.main([str(ro), *TINY]), capsys)
    assert code == 1 and "[monitor] epoch" not in out  # stopped before computing anything
    one_line(err, str(ro), "--out-dir")
    code, err, out = status(lambda: monitor.main([str(ro), *TINY, "--out-dir", str(tmp_path / "out")]), capsys)
    assert code == 0, err
    assert sorted({int(r["epoch"]) for r in read(tmp_path / "out" / "monitor.csv")}) == [0, 2, 4]
    assert digest(ro) == before and digest(src) == before  # nothing written into the run directory


def test_full_disk_keeps_previous_monitor_csv(run_dir, tmp_path, mount, capsys):
    out = mount(["-t", "tmpfs", "-o", "size=64k", "tmpfs"], tmp_path / "full")
    (out / "monitor.csv").write_text("checkpoint,epoch\nprevious,1\n")
    with open(out / "filler", "wb", buffering=0) as f:  # fill the disk
        try:
            while f.write(b"x" * 1024):
                pass
        except OSError:
            pass
    before = digest(out)
    code, err, _ = status(lambda: monitor.main([str(run_dir), *TINY, "--out-dir", str(out)]), capsys)
    assert code == 1
    one_line(err, str(out / "monitor.csv"), "previous file is unchanged")
    assert digest(out) == before and sorted(p.name for p in out.iterdir()) == ["filler", "monitor.csv"]


# ---- damaged checkpoints among good ones ----------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "zero-byte"])
@pytest.mark.parametrize("skip", [False, True])
def test_damaged_checkpoint(run_dir, tmp_path, capsys, damage, skip):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    bad = run / "ckpt_epoch0002.pt"
    bad.write_bytes(bad.read_bytes()[:1000] if damage == "truncated" else b"")
    before, out = digest(run), tmp_path / "out"
    argv = [str(run), *TINY, "--out-dir", str(out)] + (["--skip-damaged"] if skip else [])
    code, err, stdout = status(lambda: monitor.main(argv), capsys)
    assert digest(run) == before  # no checkpoint changed
    if not skip:
        assert code == 1 and "[monitor] epoch" not in stdout and not (out / "monitor.csv").exists()
        one_line(err, "ckpt_epoch0002.pt", "--skip-damaged", "empty" if damage == "zero-byte" else "damaged")
    else:
        assert code == 0 and "warning: skipping" in err and "ckpt_epoch0002.pt" in err and "Traceback" not in err
        assert sorted({int(r["epoch"]) for r in read(out / "monitor.csv")}) == [0, 4]


# ---- bad flags: one line, exit 2, before any work ---------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["--n-clusters", "1"], "--n-clusters"), (["--lidar-images", "1"], "--lidar-images"),
    (["--lidar-views", "1"], "--lidar-views"), (["--max-samples", "-1"], "--max-samples"),
    (["--max-samples", "8"], "--max-samples"),  # fewer than K + 1 = 11 (digits: 10 classes, from the checkpoint)
    (["--max-samples", "15", "--n-clusters", "4"], "--max-samples"),  # the k-NN probe needs 20
    (["--silhouette-samples", "3", "--n-clusters", "4"], "--silhouette-samples"),
    (["--knn-k", "0"], "--knn-k"), (["--view-scale", "0", "1"], "--view-scale"),
    (["--alpha-fit-range", "0", "2"], "--alpha-fit-range"), (["--threads", "-1"], "--threads"),
    (["--features", "head"], "--features"), (["--precision", "fp16"], "--precision")])
def test_monitor_bad_flags(run_dir, capsys, argv, flag):
    before = digest(run_dir)
    code, err, out = status(lambda: monitor.main([str(run_dir), *argv]), capsys)
    assert code == 2 and "[monitor]" not in out
    one_line(err, f"argument {flag}")
    assert digest(run_dir) == before


def test_monitor_benchmark_too_small(capsys):
    code, err, _ = status(lambda: monitor.main(["--benchmark", "5"]), capsys)
    assert code == 2
    one_line(err, "argument --benchmark", "K=10", ">= 11")


@pytest.mark.parametrize("script, argv, flag", [
    ("excb", ["--samples", "-1"], "--samples"), ("excb", ["--samples", "5"], "--samples"),
    ("excb", ["--tsne-classes", "0"], "--tsne-classes"), ("excb", ["--tsne-per-class", "2"], "--tsne-per-class"),
    ("excb", ["--bn", "train"], "--bn"), ("excb", ["--batch-size", "0"], "--batch-size"),
    ("excb", ["--workers", "-1"], "--workers"), ("excb", ["--threads", "x"], "--threads"),
    ("excb", ["--nope"], "unrecognized arguments"),
    ("resa", ["--samples", "-5"], "--samples"), ("resa", ["--samples", "5"], "--samples"),
    ("resa", ["--n-init", "0"], "--n-init"), ("resa", ["--split", "val"], "--split"),
    ("resa", ["--metric", "l1"], "--metric"), ("resa", ["--seed", "-1"], "--seed")])
def test_analyze_bad_flags(run_dir, tmp_path, capsys, script, argv, flag):
    before = digest(run_dir)
    fn = {"excb": excb.analyze, "resa": resa.analyze}[script]
    code, err, _ = status(lambda: fn([str(run_dir), *argv, "--out-dir", str(tmp_path / "out")]), capsys)
    assert code == 2
    one_line(err, flag, f"{script}.py analyze")
    assert digest(run_dir) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["excb", "resa"])
def test_analyze_on_a_read_only_run_dir_stops_before_any_work(run_dir, tmp_path, mount, capsys, script):
    ro = mount(["--bind", "-o", "ro", str(run_dir)], tmp_path / "fake_digits")
    before = digest(ro)
    fn = {"excb": excb.analyze, "resa": resa.analyze}[script]
    code, err, out = status(lambda: fn([str(ro)]), capsys)
    assert code == 1 and "epoch" not in out  # no checkpoint was analysed
    one_line(err, str(ro), "read-only", "--out-dir")
    assert digest(ro) == before
