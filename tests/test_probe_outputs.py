"""probe.py's outputs for pandas and for the eye (issue 22): the unit column of probe.csv / probe.json (merged
with a probe.csv of an older version that has none) and the figures (a title naming the run and the method,
axis labels with units, integer epoch ticks, legends beside the axes, no empty panel)."""
import csv
import json
import sys
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import probe  # noqa: E402
from test_probe_errors import FAST, _cli, good  # noqa: E402,F401  (good: the two-checkpoint run fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
OLD = "checkpoint epoch method features dataset precision probe metric shots value std".split()  # before units


def test_unit_column_and_merge_with_an_older_probe_csv(good, tmp_path, capsys):  # noqa: F811 (the fixture)
    old = [{"checkpoint": "ckpt_epoch0009.pt", "epoch": "9", "method": "test", "features": "backbone",
            "dataset": "digits", "precision": "fp32", "probe": p, "metric": m, "shots": "", "value": v,
            "std": ""}
           for p, m, v in (("linear", "top1", "91.5"), ("cdnv", "cdnv_test", "0.8"))]
    with open(tmp_path / "probe.csv", "w", newline="") as f:
        w = csv.DictWriter(f, OLD)
        w.writeheader()
        w.writerows(old)
    code, err = _cli([good, *FAST[:1], "knn,cdnv", *FAST[2:], "--out-dir", tmp_path], capsys)
    assert code == 0 and not err, err
    with open(tmp_path / "probe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == probe.FIELDS and rows[-1]["checkpoint"] == "ckpt_epoch0009.pt"  # old rows kept
    assert {r["checkpoint"] for r in rows} == {"ckpt_epoch0000.pt", "ckpt_epoch0001.pt", "ckpt_epoch0009.pt"}
    for r in rows:  # numbers only in value (float() is what pandas does), the unit beside it
        assert float(r["value"]) >= 0 and r["unit"] == ("ratio" if r["probe"] == "cdnv" else "%"), r
    js = json.loads((tmp_path / "probe.json").read_text())
    assert [r["unit"] for r in js] == [r["unit"] for r in rows] and isinstance(js[0]["epoch"], int)


def _rows():
    """probe.csv rows (as text) of a 3-checkpoint run with k-NN, linear and few-shot probes."""
    rows = []
    for e in (0, 1, 2):
        base = {"checkpoint": f"ckpt_epoch000{e}.pt", "epoch": str(e), "method": "resa", "features": "backbone",
                "dataset": "digits", "std": ""}
        rows += [{**base, "probe": "knn", "metric": "top1_cosine_k20", "shots": "", "value": str(80 + e)},
                 {**base, "probe": "linear", "metric": "top1", "shots": "", "value": str(70 + 5 * e)}]
        rows += [{**base, "probe": "fewshot", "metric": m, "shots": str(n), "value": str(v + e), "std": "1.5"}
                 for n in (1, 5, 10) for m, v in (("nccc_test", 40 + n), ("linear_test", 30 + n),
                                                  ("nccc_2way_err_test", 20 - n), ("bound_2way", 300 / n))]
    return rows


def test_every_figure_has_a_title_units_integer_epochs_and_legends_beside_the_data(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, f, **k: saved.append(self) or Path(f).write_bytes(b"x"))
    paths = probe._plots(tmp_path, _rows(), "backbone", "resa_digits")
    assert [p.name for p in paths] == ["probe_epoch_backbone.png", "probe_fewshot_ckpt_epoch0002_backbone.png"]
    assert len(saved) == 2
    for fig in saved:
        FigureCanvasAgg(fig).draw()
        titles = [fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in fig.axes]
        assert any("resa_digits" in t and "resa" in t.replace("resa_digits", "") for t in titles), titles
        for ax in fig.axes:
            assert ax.lines, "an empty panel"
            assert ax.get_xlabel() and ax.get_ylabel(), (ax.get_xlabel(), ax.get_ylabel())
            assert "(%)" in ax.get_ylabel()
            leg, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
            assert leg.x0 >= box.x1, "the legend overlaps the axes"
    epoch_ax = saved[0].axes[0]
    assert epoch_ax.get_xlabel() == "epoch"
    ticks = [t for t in epoch_ax.get_xticks() if 0 <= t <= 2]
    assert ticks == [0, 1, 2], ticks  # whole epochs, not 0.25 steps
    assert [t.get_text() for t in saved[1].axes[0].get_xticklabels()] == ["1", "5", "10"]  # the N probed
