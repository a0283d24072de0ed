"""common.parse_args's validation from the Args metadata, and section 5's shared evaluation plumbing."""
import csv
import dataclasses

import pytest
import torch

import common


def _f(default, help="", **check):
    return dataclasses.field(default=default, metadata={"help": help, **check})


@dataclasses.dataclass
class _Args:
    # --- method ---
    loss: str = _f("a", "the loss", choices=("a", "b"))
    temperature: float = _f(0.5, "tau", range="(0, inf)")
    # --- optimisation ---
    epochs: int = _f(10, "epochs", range="[1, inf)")
    p: float = _f(0.5, "a probability", range="[0, 1]")
    scale: tuple[float, float] = _f((0.2, 1.0), "crop scale", range="(0, 1]")
    probes: tuple[str, ...] = _f(("knn",), "probes", choices=("knn", "linear"))
    flag: bool = _f(False, "a switch")


def _error(capsys, argv, presets=None):
    """parse_args(argv) must exit 2 with ONE stderr line starting with 'error:'; returns that line."""
    with pytest.raises(SystemExit) as e:
        common.parse_args(_Args, presets or {}, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_valid_values_pass_and_keep_types():
    a = common.parse_args(_Args, {}, ["--loss", "b", "--temperature", "0.1", "--epochs", "1", "--p", "1",
                                      "--scale", "0.5", "1", "--probes", "knn", "linear", "--flag"])
    assert (a.loss, a.temperature, a.epochs, a.p, a.scale, a.probes, a.flag) == (
        "b", 0.1, 1, 1.0, (0.5, 1.0), ("knn", "linear"), True)


@pytest.mark.parametrize("argv, names", [
    (["--loss", "c"], ["--loss", "'c'", "'a', 'b'"]),
    (["--temperature", "0"], ["--temperature", "(0, inf)"]),
    (["--temperature", "nan"], ["--temperature", "nan"]),
    (["--temperature", "inf"], ["--temperature", "inf"]),
    (["--epochs", "0"], ["--epochs", "[1, inf)"]),
    (["--epochs", "-1"], ["--epochs", "-1"]),
    (["--epochs", "two"], ["--epochs", "two"]),
    (["--p", "1.5"], ["--p", "[0, 1]"]),
    (["--scale", "0.2", "0"], ["--scale", "0"]),
    (["--probes", "knn", "svm"], ["--probes", "svm"]),
    (["--no-such-flag"], ["--no-such-flag"]),
])
def test_bad_values_are_one_line_usage_errors(capsys, argv, names):
    line = _error(capsys, argv)
    for n in names:
        assert n in line, (n, line)


def test_unknown_preset_is_a_usage_error(capsys):
    line = _error(capsys, ["--preset", "huge"], {"tiny": {"epochs": 1}})
    assert "--preset" in line and "huge" in line and "tiny" in line


def test_help_is_grouped_by_the_args_comments(capsys):
    with pytest.raises(SystemExit):
        common.parse_args(_Args, {}, ["--help"])
    out = capsys.readouterr().out
    assert out.index("method:") < out.index("--loss") < out.index("optimisation:") < out.index("--epochs")
    assert "{a,b}" in out


def test_knn_accuracy_matches_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    tx, ty = torch.randn(60, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (60,), generator=g)
    qx = torch.randn(9, 5, generator=g, dtype=torch.float64)
    scores = common.knn_predict(tx, ty, qx, k=4, temperature=0.1, chunk_elems=60 * 2)  # several chunks
    for i, q in enumerate(qx):  # the DINO vote by hand: the 4 largest cosines, weights exp(cos / T)
        cos = torch.nn.functional.cosine_similarity(tx, q[None], dim=1)
        top = cos.argsort(descending=True)[:4]
        want = torch.zeros(3, dtype=torch.float64).index_add_(0, ty[top], (cos[top] / 0.1).exp())
        assert torch.allclose(scores[i], want)
    euclid = common.knn_predict(tx, ty, qx, k=1, metric="euclidean").argmax(1)
    nearest = ty[torch.cdist(qx, tx).argmin(1)]
    assert torch.equal(euclid, nearest)
    assert common.knn_accuracy(tx, ty, tx, ty, k=1, metric="euclidean") == 100.0


def test_cpu_threads_limits_and_restores():
    before = torch.get_num_threads()
    with common.cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with common.cpu_threads(0):
        assert torch.get_num_threads() == before


def test_path_first_and_run_dir_of(tmp_path):
    assert common.path_first(["runs/x", "--k", "1"], "--path") == ["--path", "runs/x", "--k", "1"]
    assert common.path_first(["--k", "1"], "--path") == ["--k", "1"]
    ckpt = tmp_path / "ckpt_epoch0001.pt"
    ckpt.write_bytes(b"")
    assert common.run_dir_of(ckpt) == tmp_path and common.run_dir_of(tmp_path) == tmp_path


def test_write_csv_is_complete_and_leaves_no_temporary(tmp_path):
    rows = [{"a": 1, "b": None, "extra": 3}, {"a": 2}]
    path = common.write_csv(tmp_path / "sub" / "out.csv", rows, ["a", "b"])
    with open(path) as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": ""}, {"a": "2", "b": ""}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.csv"]


def test_eval_transform_applies_the_imagenet_resize_rule():
    from PIL import Image

    assert common.eval_transform(224)(Image.new("RGB", (300, 260))).shape == (3, 224, 224)
    assert common.eval_transform(32)(Image.new("RGB", (32, 32))).shape == (3, 32, 32)
    def names(size):
        return [type(t).__name__ for t in common.eval_transform(size).transforms]
    assert "CenterCrop" in names(224) and "CenterCrop" not in names(32)


def test_progress_prints_at_most_every_interval_with_an_eta(capsys, monkeypatch):
    clock = iter([0.0, 1.0, 6.0, 7.0, 12.5])  # start, then one reading per update
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    p = common.Progress("extract train", total=100, unit="images")
    for _ in range(4):
        p.update(10)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2  # at 6 s and 12.5 s, not at 1 s or 7 s
    assert "20/100 images (20 %)" in lines[0] and "eta 0:24" in lines[0]  # 80 left at 20 / 6 s
    assert "40/100" in lines[1]
