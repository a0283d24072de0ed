"""probe.py's run-time failures (issue 21), each one line and nothing lost: damaged or empty checkpoints
among good ones (with and without --skip-damaged), subsets and shots the data cannot give, an unwritable
output (a real read-only mount, a path under a regular file), a full disk (a real 64 KiB tmpfs) and the
feature cache under --out-dir beside a read-only run directory. Every case asserts the exit status, one line,
what it names, no traceback, and that the checkpoints and any previous probe.csv are byte-for-byte unchanged."""
import contextlib
import hashlib
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import probe  # noqa: E402
from test_probe_cli import SIZE, _save  # noqa: E402  (the checkpoint writer of the CLI tests)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
FAST = ["--probes", "knn", "--max-train", "200", "--max-test", "100", "--no-plots"]  # about 1 s a checkpoint
RUN_TIME = (1,)  # common.run: a damaged, missing or foreign checkpoint is a run-time failure


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A run directory with two random-init digits convnets (epochs 0 and 1)."""
    d = tmp_path_factory.mktemp("probe_good")
    for epoch in (0, 1):
        torch.manual_seed(epoch)
        _save(d / f"ckpt_epoch{epoch:04d}.pt", common.build_backbone("convnet", SIZE)[0], epoch)
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _digest(d):
    """{name: sha256} of every file below d: "byte-for-byte unchanged" is equality of two of these."""
    files = [p for p in sorted(Path(d).rglob("*")) if p.is_file()]
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _cli(argv, capsys):
    """probe.py's command line in this process -> (exit status, stderr lines). sys.exit("error: ...") is
    status 1 with the message printed by the interpreter: returned as that line. Any other exception (a
    traceback) fails the test."""
    try:
        common.run(lambda: probe.main([str(a) for a in argv]))
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    if isinstance(code, str):
        code, err = 1, err + [code]
    return code, err


@contextlib.contextmanager
def _mount(target, *options, bind=None):
    """A real mount at target (tmpfs, or a read-only bind of `bind`), unmounted at the end; the test is
    skipped, saying why, where this machine does not allow mounting."""
    Path(target).mkdir(parents=True, exist_ok=True)
    cmds = ([["mount", "--bind", str(bind), str(target)], ["mount", "-o", "remount,bind,ro", str(target)]]
            if bind else [["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(target)]])
    mounted = False
    try:
        for cmd in cmds:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                pytest.skip(f"mounting is not permitted here ({' '.join(cmd[:2])}: {r.stderr.strip()})")
            mounted = True
        yield Path(target)
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], capture_output=True)


def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "garbage": b"\x00not a zip" * 99}[how])


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_a_damaged_checkpoint_stops_before_anything_is_written(good, tmp_path, capsys, how):
    d = _copy(good, tmp_path / "run")
    bad = d / "ckpt_epoch0001.pt"
    _damage(bad, how)
    before = _digest(d)
    code, err = _cli([d, *FAST], capsys)
    assert code in RUN_TIME and len(err) == 1, err
    assert err[0].startswith("error: ") and str(bad) in err[0] and "--skip-damaged" in err[0], err
    assert "Traceback" not in err[0] and ("0 bytes" in err[0]) == (how == "empty")
    assert _digest(d) == before and sorted(p.name for p in d.iterdir()) == sorted(before)  # nothing written


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_skip_damaged_warns_once_and_probes_the_rest(good, tmp_path, capsys, how):
    d = _copy(good, tmp_path / "run")
    bad = d / "ckpt_epoch0000.pt"
    _damage(bad, how)
    before = _digest(d)
    code, err = _cli([d, *FAST, "--skip-damaged"], capsys)
    assert code == 0 and len(err) == 1 and err[0].startswith("warning: ") and str(bad) in err[0], err
    rows = (d / "probe.csv").read_text().splitlines()[1:]
    assert rows and all(r.startswith("ckpt_epoch0001.pt,") for r in rows)
    assert all(_digest(d)[k] == v for k, v in before.items())  # the checkpoints, damaged one included


def test_only_damaged_checkpoints_is_one_line_even_with_skip_damaged(good, tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    (d / "ckpt_epoch0003.pt").write_bytes(b"")
    code, err = _cli([d, *FAST, "--skip-damaged"], capsys)
    assert code in RUN_TIME and err[-1] == "error: no readable checkpoint among the 1 files given", err
    code, err = _cli([d / "ckpt_epoch0003.pt", *FAST], capsys)  # a single file: no flag to offer
    assert code in RUN_TIME and len(err) == 1 and "--skip-damaged" not in err[0] and "0 bytes" in err[0], err


@pytest.mark.parametrize("argv,line", [
    (["--max-train", "5000"], "argument --max-train: 5000 is more than the 1437 images of the digits train "
                              "split; use at most 1437 (0 = all)"),
    (["--max-test", "361"], "argument --max-test: 361 is more than the 360 images of the digits test split; "
                            "use at most 360 (0 = all)"),
    (["--max-train", "200", "--probes", "knn,fewshot", "--shots", "1", "500"],
     "argument --shots: 500 is more than the 20 images of the smallest class in the --max-train 200 subset; "
     "use at most 20"),
    (["--probes", "fewshot", "--shots", "1", "300"], "argument --shots: 300 is more than the 139 images of the "
                                                     "smallest class in the train split; use at most 139"),
])
def test_subsets_and_shots_the_data_cannot_give_are_usage_errors(good, tmp_path, capsys, argv, line):
    """Exit 2 naming the flag, its value and the largest that works; --max-* before any extraction, --shots
    before any probe; nothing written."""
    d = _copy(good, tmp_path / "run")
    before = _digest(d)
    code, err = _cli([d, "--no-plots", "--max-test", "100", "--probes", "knn", *argv], capsys)
    assert code == 2 and err == [f"error: {line}"], err
    assert not (d / "probe.csv").exists() and all(_digest(d).get(k) == v for k, v in before.items())


def test_default_shots_above_the_smallest_class_are_skipped(good, tmp_path, capsys):
    code, err = _cli([good / "ckpt_epoch0001.pt", "--probes", "fewshot", "--max-train", "200", "--max-test",
                      "100", "--repeats", "1", "--fewshot-epochs", "1", "--no-plots", "--out-dir", tmp_path],
                     capsys)
    shots = {r.split(",")[8] for r in (tmp_path / "probe.csv").read_text().splitlines()[1:]}
    assert code == 0 and not err and shots == {"1", "5", "10", "20"}  # 50 ... 500 > 20 images: skipped


@pytest.mark.parametrize("where", ["a_file", "below_a_file", "read_only_out_dir", "read_only_run_dir"])
def test_an_unwritable_output_is_one_line_before_any_work(good, tmp_path, capsys, where):
    run = _copy(good, tmp_path / "run")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "out").mkdir()
    out = {"a_file": tmp_path / "a_file", "below_a_file": tmp_path / "a_file" / "sub" / "dir"}.get(where)
    with contextlib.ExitStack() as stack:
        if where == "read_only_out_dir":
            out = stack.enter_context(_mount(tmp_path / "ro", bind=tmp_path / "out"))
        if where == "read_only_run_dir":  # no --out-dir: the run directory is the output directory
            run = stack.enter_context(_mount(tmp_path / "ro", bind=run))
        before = _digest(run)
        code, err = _cli([run, *FAST] + (["--out-dir", out] if out else []), capsys)
        assert code == 1 and len(err) == 1, err
        assert err[0].startswith(f"error: cannot write to {out or run} (") and "--out-dir" in err[0], err
        assert _digest(run) == before and not any((out or run).glob("*probe*"))  # nothing written


def test_the_feature_cache_goes_under_out_dir_beside_a_read_only_run_dir(good, tmp_path, capsys):
    d = _copy(good, tmp_path / "run")
    with _mount(tmp_path / "ro", bind=d) as ro:
        before = _digest(ro)
        code, err = _cli([ro, *FAST, "--out-dir", tmp_path / "out"], capsys)
        assert code == 0 and not err, err
        assert _digest(ro) == before
    assert (tmp_path / "out" / "probe.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "out" / "features").iterdir()) == [
        f"ckpt_epoch000{e}_digits_{s}_backbone_fp32_n{n}.pt" for e in (0, 1) for s, n in (("test", 100),
                                                                                            ("train", 200))]


@pytest.mark.parametrize("cache", [False, True])
def test_a_full_disk_keeps_the_previous_probe_csv(good, tmp_path, capsys, cache):
    """A 64 KiB tmpfs holding an earlier probe.csv, then filled: probe.csv (--no-cache) or the feature cache
    cannot be written -> exit 1, one line naming the file, the old probe.csv intact, no temporary files."""
    _cli([good, *FAST, "--out-dir", tmp_path / "prev"], capsys)
    with _mount(tmp_path / "full", "size=64k") as full:
        shutil.copy(tmp_path / "prev" / "probe.csv", full / "probe.csv")
        with contextlib.suppress(OSError), open(full / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 512)
                f.flush()
        before, ckpts = _digest(full), _digest(good)
        code, err = _cli([good, *FAST, "--out-dir", full] + ([] if cache else ["--no-cache"]), capsys)
        assert code == 1 and len(err) == 1, err
        cache_file = full / "features" / "ckpt_epoch0000_digits_train_backbone_fp32_n200.pt"
        named = cache_file if cache else full / "probe.csv"
        assert err[0].startswith(f"error: cannot write {named} (") and "--out-dir" in err[0], err
        assert _digest(full) == before and _digest(good) == ckpts
        assert not [p for p in full.rglob(".*")], "temporary files left behind"


def test_the_command_line_prints_one_line_and_no_traceback(good, tmp_path):
    """The real interpreter: sys.exit's line on stderr, status 1, nothing else on stderr."""
    out = tmp_path / f"a_file_{uuid.uuid4().hex[:6]}"
    out.write_text("x")
    r = subprocess.run([sys.executable, str(ROOT / "probe.py"), str(good), *FAST, "--out-dir", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: cannot write to {out} (Not a directory); pass --out-dir DIR, a writable directory (probe.csv, "
        f"probe.json, the PNGs and the feature cache go there)"], r.stderr
