"""Print the study's tables (markdown) from the files docs/study.sh writes: probe.csv, monitor_correlations.csv,
losses.csv, excb.csv and log.jsonl of each run. Every number of docs/results.md's CIFAR-10 study comes from here; the
first table (first, middle and last checkpoint) is the summary table of the README's "Results at a glance".

    python docs/study_tables.py runs/study            # OUT of docs/study.sh
"""
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

RUNS = {"excb": "ExCB (no multi-crop)", "resa": "ReSA", "simclr": "SimCLR (NT-Xent)", "nscl": "NSCL"}
# (probe, metric, shots) -> column title; test accuracy in %
PROBES = {("knn", "top1_cosine_k20", ""): "k-NN cos k=20", ("knn", "top1_euclidean_k5", ""): "k-NN L2 k=5",
          ("linear", "top1", ""): "linear top-1", ("fewshot", "nccc_test", "10"): "NCC 10-shot",
          ("fewshot", "linear_test", "10"): "few-shot linear 10-shot"}
MONITOR = {"agreement": "k-means agreement AMI(views)", "silhouette": "k-means silhouette",
           "entropy_gaussian": "Gaussian entropy", "entropy_knn": "k-NN entropy", "rankme": "RankMe",
           "alpha_req": "alpha-ReQ", "lidar": "LiDAR", "ami_gt": "AMI vs ground truth (uses labels)"}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print()


def probes(out):
    """Probe accuracy per method and checkpoint (backbone features); all epochs, and first / middle / last."""
    full, short = [], []
    for run, name in RUNS.items():
        acc = defaultdict(dict)
        for r in read_csv(out / run / "probe.csv"):
            key = (r["probe"], r["metric"], r["shots"])
            if r["features"] == "backbone" and key in PROBES:
                acc[int(r["epoch"])][PROBES[key]] = float(r["value"])
        epochs = sorted(acc)
        for e in epochs:
            row = [name, e] + [f"{acc[e].get(c, float('nan')):.1f}" for c in PROBES.values()]
            full.append(row)
            if e in (epochs[0], epochs[len(epochs) // 2], epochs[-1]):
                short.append(row)
    print("### Probes at the first, middle and last checkpoint (test accuracy %)\n")
    table(["method", "epoch", *PROBES.values()], short)
    print("### Probes at every checkpoint\n")
    table(["method", "epoch", *PROBES.values()], full)


def correlations(out):
    """Pearson / Spearman of each monitor metric with linear-probe accuracy across checkpoints, per method: over
    all checkpoints, then without epoch 0 (the monitoring paper reads its metrics after early training)."""
    for skip, title in (("0", "all checkpoints"), ("1", "without epoch 0")):
        cells, n = defaultdict(dict), {}
        for run, name in RUNS.items():
            for r in read_csv(out / run / "monitor_correlations.csv"):
                if r["features"] == "backbone" and r["skip_early"] == skip and r["metric"] in MONITOR:
                    cells[r["metric"]][name] = f"{float(r['pearson']):.2f} / {float(r['spearman']):.2f}"
                    n[name] = r["n"]
        print(f"### Correlation with linear-probe accuracy, {title} (Pearson / Spearman over {max(n.values())} "
              "checkpoints, backbone features)\n")
        table(["metric", *RUNS.values()], [[MONITOR[m]] + [cells[m].get(v, "") for v in RUNS.values()]
                                           for m in MONITOR if m in cells])


def gap(out):
    """The CL-vs-NSCL gap of the SimCLR run (tau = 1), and the NSCL loss of both runs (Fig. 2 bottom)."""
    simclr, nscl = read_csv(out / "simclr" / "losses.csv"), {r["epoch"]: r for r in read_csv(out / "nscl" / "losses.csv")}
    print("### CL-vs-NSCL gap (tau = 1) and the NSCL loss of both runs\n")
    table(["epoch", "train gap", "test gap", "bound", "NSCL loss, SimCLR run", "NSCL loss, NSCL run"],
          [[r["epoch"], f"{float(r['train_gap']):.3f}", f"{float(r['test_gap']):.3f}", f"{float(r['bound']):.3f}",
            f"{float(r['train_nscl']):.3f}", f"{float(nscl[r['epoch']]['train_nscl']):.3f}" if r["epoch"] in nscl
            else ""] for r in simclr])


def excb_sizes(out):
    """ExCB cluster sizes by inference over the training set (relative size N_c K / N)."""
    rows = read_csv(out / "excb" / "analysis" / "excb.csv")
    print(f"### ExCB cluster sizes by inference (K = {rows[0]['K']}, N = {rows[0]['N']})\n")
    table(["epoch", "empty clusters", "largest", "10 % quantile", "median", "90 % quantile"],
          [[r["epoch"], r["empty"], f"{float(r['max_rel_size']):.2f}", f"{float(r['q10_rel_size']):.2f}",
            f"{float(r['median_rel_size']):.2f}", f"{float(r['q90_rel_size']):.2f}"] for r in rows])


def throughput(out):
    """Median of the perf/* records of each pretraining run (the first log window holds start-up; dropped)."""
    rows = []
    for run, name in RUNS.items():
        recs = [json.loads(line) for line in open(out / run / "log.jsonl")]
        perf = [r for r in recs if "perf/images_per_s" in r]
        perf = perf[1:] or perf
        med = lambda k: statistics.median(r[k] for r in perf if k in r)  # noqa: E731
        steps = max(r.get("step", 0) for r in recs)
        rows.append([name, f"{med('perf/images_per_s'):.0f}", f"{med('perf/step_time_s') * 1000:.0f} ms",
                     f"{100 * med('perf/data_frac'):.0f} %" if any("perf/data_frac" in r for r in perf) else "",
                     f"{max(r['perf/peak_mem_gb'] for r in perf):.2f} GB",
                     f"{steps * med('perf/step_time_s') / 60:.1f} min"])
    print("### Pretraining throughput (median over log windows)\n")
    table(["method", "images/s", "step time", "data wait", "peak memory", "steps x step time"], rows)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study")
    for part in (probes, correlations, gap, excb_sizes, throughput):
        part(root)
