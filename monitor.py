"""monitor.py: label-free monitoring of self-supervised training from saved checkpoints. For every checkpoint of
a run (excb.py, resa.py, simclr_nscl.py) it computes metrics that need no labels on the embeddings of
unlabelled train images (k-means silhouette, clustering agreement, entropy, RankMe, alpha-ReQ, LiDAR, TwoNN
intrinsic dimension), their Pearson / Spearman / Kendall correlation with the probe accuracy across the run
(probe.py's probe.csv, or a k-NN probe), and plots of both.

Paper: Xu, Lowe, Trappenberg, "Label-free Monitoring of Self-Supervised Learning Progress", IEEE CCECE 2022,
arXiv 2409.06612: do the silhouette of k-means clusters (S_1), the agreement of two k-means clusterings
(AMI(C_1; C_2)) and the embedding entropy (H(Z_3)) track the linear-probe accuracy over a run? It has no code;
an open point is a flag whose default is "our choice n", with its reasons in item n of
docs/monitor.md#our-choices-where-the-papers-are-silent. Extras: RankMe, alpha-ReQ, LiDAR, TwoNN.

Commands (docs/monitor.md#usage; timings: docs/monitor.md#speed-measured):
    python monitor.py runs/x                               # every checkpoint: monitor.csv, correlations, plots
    python monitor.py runs/x --features all --pairing seeds --skip-early 2
    python monitor.py --benchmark 10000                    # time the metric set on 10,000 x 512 embeddings
Outputs (in RUN_DIR, or --out-dir): monitor.csv (long format, COLUMNS below), monitor_correlations.csv,
monitor_config.json, monitor_epoch_<features>.png, monitor_probe_<features>.png.
"""

import copy
import csv
import functools
import json
import math
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats  # installed with scikit-learn
from scipy.special import digamma
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_mutual_info_score, silhouette_score

import common

# ===================================== METRICS: pure functions on an (N, D) embedding tensor (no labels) =======
# Symbols: x (N, D) embeddings of N images; K the number of k-means clusters; C_1, C_2 two clusterings (label
# vectors of length N); views (n, q, D) q augmented views of each of n images (LiDAR).
def _t64(x):
    """(N, D) tensor or array -> float64 torch tensor: spectra and log-determinants need the precision."""
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().cpu().double()


def _np32(x):
    """(N, D) tensor or array -> C-contiguous float32 numpy array (what scikit-learn's k-means runs on)."""
    return np.ascontiguousarray(_t64(x).numpy(), dtype=np.float32)


def kmeans_labels(x, n_clusters, seed, n_init=3):
    """k-means (scikit-learn, k-means++ init, Lloyd) on (N, D) -> cluster ids (N,) int64.
    our choice 3: n_init=3 restarts (sklearn's "auto" is 1)."""
    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    with warnings.catch_warnings():  # a collapsed embedding gives fewer distinct points than K: not an error here
        warnings.simplefilter("ignore")
        return km.fit_predict(_np32(x)).astype(np.int64)


def silhouette(x, labels, sample_size=None, seed=0):
    """Mean silhouette coefficient of a clustering, Euclidean, in the original space (not UMAP-reduced).
    NaN when it is undefined (fewer than 2 or more than N-1 distinct clusters, e.g. a collapsed embedding)."""
    if not 2 <= len(np.unique(labels)) <= len(labels) - 1:
        return float("nan")
    sample_size = sample_size if sample_size and sample_size < len(labels) else None  # else sklearn only permutes
    return float(silhouette_score(_np32(x), labels, metric="euclidean", sample_size=sample_size,
                                  random_state=seed))


def kmeans_silhouette(x, n_clusters, seed, sample_size=None, n_init=3):
    """S_1 of the paper: k-means clustering C_1 of x, then its silhouette score on a random subset of sample_size
    rows (cost O(sample_size^2 D); None = all). The CLI reuses C_1 (agreement, AMI vs labels) instead."""
    return silhouette(x, kmeans_labels(x, n_clusters, seed, n_init), sample_size, seed)


def clustering_agreement(x_a, x_b, n_clusters, seed, seed_b=None, n_init=3, labels_a=None):
    """AMI(C_1; C_2): adjusted mutual information of the k-means clusterings of two embedding sets of the SAME
    images (row i of x_a and x_b is image i); labels_a: C_1 if already computed for x_a with (n_clusters, seed).
    our choice 4: --pairing views (x_b = an augmented view, same seed) or seeds (x_b = x_a, seed_b)."""
    seed_b = seed if seed_b is None else seed_b
    if labels_a is None:
        labels_a = kmeans_labels(x_a, n_clusters, seed, n_init)
    labels_b = kmeans_labels(x_b, n_clusters, seed_b, n_init)
    return float(adjusted_mutual_info_score(labels_a, labels_b))


def gaussian_entropy(x, eps=1e-6):
    """Differential entropy (nats) of the Gaussian with the sample covariance of x (N, D), an upper bound on H(Z):
        H = D/2 * log(2 pi e) + 1/2 * log det(Sigma + eps I).   our choice 7: eps = 1e-6 absolute (units^2)."""
    logdet = (covariance_spectrum(x) + eps).log().sum()  # log det(Sigma + eps I) from the eigenvalues of Sigma
    return float(0.5 * x.shape[1] * math.log(2 * math.pi * math.e) + 0.5 * logdet)


def knn_distances(x, k, chunk=1024):
    """Euclidean distances of each row of x (N, D) to its k nearest other rows, ascending -> (N, k) float64: the
    candidates of a float32 Gram matrix (chunked, O(N^2 D)), recomputed in float64 (near-duplicates stay > 0)."""
    x64 = _t64(x)
    x = (x64 - x64.mean(0, keepdim=True)).float()  # translation-invariant; centred, |a|^2 + |b|^2 - 2ab is stable
    sq = (x * x).sum(1)
    out = torch.empty(len(x), k, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        d2 = sq[i:i + chunk, None] + sq[None, :] - 2.0 * x[i:i + chunk] @ x.T  # (chunk, N)
        d2[torch.arange(d2.shape[0]), torch.arange(i, i + d2.shape[0])] = float("inf")  # not its own neighbour
        idx = d2.topk(k, dim=1, largest=False).indices  # (chunk, k)
        out[i:i + chunk] = (x64[i:i + chunk, None] - x64[idx]).norm(dim=2).sort(dim=1).values
    return out


def knn_entropy(x, k=3, min_dist=1e-10):
    """Kozachenko-Leonenko k-NN estimate of the differential entropy (nats) of x (N, D):
        H = psi(N) - psi(k) + log V_D + D/N * sum_i log r_i,
    r_i = Euclidean distance from x_i to its k-th nearest neighbour, V_D = pi^(D/2) / Gamma(D/2 + 1) the
    volume of the unit D-ball (Kraskov, Stoegbauer, Grassberger 2004, Eq. (20) with the Euclidean norm).
    our choice 7: k = 3, distances floored at min_dist (duplicates); biased in high D: compare within a run."""
    n, d = x.shape
    r = knn_distances(x, k)[:, -1].clamp_min(min_dist)
    log_vd = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)
    return float(digamma(n) - digamma(k) + log_vd + d * r.log().mean())


def intrinsic_dimension(x):
    """TwoNN intrinsic dimension of x (N, D) (Facco, d'Errico, Rodriguez, Laio, Sci. Rep. 7, 12140, 2017).
    mu_i = r2_i / r1_i, the ratio of a point's distances to its 2nd and 1st nearest neighbours, follows for
    locally uniform data on a d-dimensional manifold the Pareto law F(mu) = 1 - mu^(-d), whatever the density.
    our choice 12: its MLE, N - 1 for N: d = (N - 1) / sum_i log mu_i, over the distinct rows (r1 > 0); NaN with
    fewer than 3. A collapsed embedding gives a low value."""
    x = np.unique(_np32(x), axis=0)  # (N', D) distinct rows: every r1 > 0
    if len(x) < 3:
        return float("nan")
    r = knn_distances(x, 2)  # (N', 2): r1, r2
    return float((len(x) - 1) / (r[:, 1] / r[:, 0]).log().sum())


def embedding_entropy(x, estimator="gaussian", eps=1e-6, k=3):
    """H(Z_3) of the paper, in nats. estimator: "gaussian" (log-det, see gaussian_entropy) or "knn"
    (Kozachenko-Leonenko, see knn_entropy). our choice 7: the CLI reports both (--entropy), on raw embeddings."""
    if estimator not in ("gaussian", "knn"):
        raise ValueError(f"estimator must be 'gaussian' or 'knn', got {estimator!r}")
    return gaussian_entropy(x, eps) if estimator == "gaussian" else knn_entropy(x, k)


def rankme(x, eps=1e-7, center=False):
    """RankMe (Garrido et al., ICML 2023, Eq. (1)): the exponential of the entropy of normalised singular values
        p_k = sigma_k / ||sigma||_1 + eps,   RankMe = exp(-sum_k p_k log p_k).
    A smooth rank: ~r for rank-r data with a flat spectrum, ~min(N, D) for isotropic data. our choice 8: eps =
    1e-7, no centring (the paper's); center=True: the covariance's rank (a mean offset then adds none)."""
    x = _t64(x)
    s = torch.linalg.svdvals(x - x.mean(0, keepdim=True) if center else x)  # (min(N, D),)
    p = s / s.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def covariance_spectrum(x):
    """Eigenvalues of the covariance of centred x (N, D), descending, float64 -> (D,)."""
    x = _t64(x)
    xc = x - x.mean(0, keepdim=True)
    return torch.linalg.eigvalsh(xc.T @ xc / max(len(x) - 1, 1)).flip(0).clamp_min(0)


def alpha_req(x, fit_range=(0.0, 0.5)):
    """alpha-ReQ (Agrawal et al., NeurIPS 2022): fit lambda_k ~ k^(-alpha), least squares of log lambda_k on log k
    -> {"alpha", "r2" (of the log-log fit), "fit_lo", "fit_hi" (the 1-based ranks used)}. our choice 9: ranks in
    (fit_range[0] * r, fit_range[1] * r], r = the number of eigenvalues above 1e-12 * lambda_1."""
    lam = covariance_spectrum(x)
    r = int((lam > lam[0] * 1e-12).sum()) if lam[0] > 0 else 0
    lo, hi = int(fit_range[0] * r) + 1, int(fit_range[1] * r)  # int() floors: both are >= 0
    if hi - lo + 1 < 3:
        return {"alpha": float("nan"), "r2": float("nan"), "fit_lo": lo, "fit_hi": hi}
    lx, ly = np.log(np.arange(lo, hi + 1)), lam[lo - 1:hi].log().numpy()
    slope = np.polyfit(lx, ly, 1)[0]  # least squares line, log-log; R^2 = squared Pearson r of the fitted points
    return {"alpha": float(-slope), "r2": float(np.corrcoef(lx, ly)[0, 1] ** 2), "fit_lo": lo, "fit_hi": hi}


def lidar(views, delta=1e-4, eps=1e-8):
    """LiDAR (Thilak et al., ICLR 2024): the smooth rank of the LDA matrix whose classes are the images.
    views: (n, q, D), q augmented views of each of n images (each surrogate class is ONE image).
        mu_x = mean of x's views; mu = mean of the mu_x
        Sigma_b = 1/(n-1) sum_x (mu_x - mu)(mu_x - mu)^T
        Sigma_w = 1/(n(q-1)) sum_x sum_i (e_xi - mu_x)(e_xi - mu_x)^T + delta I
        Sigma_LiDAR = Sigma_w^(-1/2) Sigma_b Sigma_w^(-1/2), eigenvalues lambda
        p_i = (lambda_i + eps) / sum_j (lambda_j + eps),  LiDAR = exp(-sum_i p_i log p_i)
    It is at most min(D, n - 1). our choice 10: delta = 1e-4, eps = 1e-8 (stable-ssl's defaults), float64.
    """
    e = _t64(views)
    n, q, d = e.shape
    if n < 2 or q < 2:
        raise ValueError(f"lidar needs n >= 2 images and q >= 2 views each, got views of shape {tuple(e.shape)}")
    mu_x = e.mean(1)  # (n, D)
    b = mu_x - mu_x.mean(0, keepdim=True)
    sigma_b = b.T @ b / (n - 1)  # (D, D)
    w = (e - mu_x[:, None]).reshape(n * q, d)
    sigma_w = w.T @ w / (n * (q - 1)) + delta * torch.eye(d, dtype=e.dtype)  # (D, D), positive definite
    ev, vec = torch.linalg.eigh(sigma_w)
    w_isqrt = vec @ torch.diag(ev.rsqrt()) @ vec.T  # Sigma_w^(-1/2)
    lam = torch.linalg.eigvalsh(w_isqrt @ sigma_b @ w_isqrt).clamp_min(0)
    p = (lam + eps) / (lam + eps).sum()
    return float(torch.exp(-(p * p.log()).sum()))


# ===================================== CORRELATION with the probe accuracy across checkpoints ==================
def correlation_report(metric, probe, skip_early=0):
    """Pearson, Spearman and Kendall (tau-b) correlation of a metric series with the probe accuracy series
    (one value per checkpoint, in epoch order), after dropping the first `skip_early` checkpoints and any
    checkpoint where either value is NaN (our choice 11) -> {"n", "pearson", "spearman", "kendall"}, NaN where
    undefined (fewer than 3 points, a constant series)."""
    m, p = (np.asarray(v, dtype=np.float64)[skip_early:] for v in (metric, probe))
    ok = np.isfinite(m) & np.isfinite(p)
    m, p = m[ok], p[ok]
    defined = len(m) >= 3 and np.ptp(m) > 0 and np.ptp(p) > 0
    tests = {"pearson": stats.pearsonr, "spearman": stats.spearmanr, "kendall": stats.kendalltau}
    return {"n": int(ok.sum()), **{k: float(fn(m, p)[0]) if defined else float("nan") for k, fn in tests.items()}}

# ===================================== CONFIG (every default: docs/monitor.md) =================================
def _f(default, help, **check):
    """A dataclass field with its --help text and the checks common.parse_args applies (choices=, range=)."""
    return field(default=default, metadata={"help": help, **check})


@dataclass
class Args:
    # what to monitor
    run_dir: str = _f("", "run directory (its *.pt files) or one checkpoint; may come first, without the flag")
    out_dir: str = _f("", "where every output goes ('' = the run dir, which must then be writable)")
    data_dir: str = _f("", "dataset folder ('' = the checkpoint's own)")
    features: str = _f("backbone", "embedding the metrics see", choices=("backbone", "projector", "all"))
    max_samples: int = _f(5000, "unlabelled train images per checkpoint (0 = all)", range="[0, inf)")
    seed: int = _f(0, "seed of k-means, the silhouette subset and the augmentations", range="[0, inf)")
    # label-free metrics
    n_clusters: int = _f(0, "k-means K, >= 2 (0 = the dataset's number of classes)", range="[0, inf)")
    kmeans_n_init: int = _f(3, "k-means restarts (k-means++ init each)", range="[1, inf)")
    pairing: str = _f("views", "agreement: clean vs augmented, or 2 k-means seeds", choices=("views", "seeds"))
    view_scale: tuple[float, float] = _f((0.2, 1.0), "crop scale of the augmented views", range="(0, 1]")
    silhouette_samples: int = _f(5000, "rows the silhouette is computed on (0 = all)", range="[0, inf)")
    entropy: tuple[str, ...] = _f(("gaussian", "knn"), "entropy estimators", choices=("gaussian", "knn"))
    entropy_eps: float = _f(1e-6, "Gaussian entropy: eps I added to the covariance", range="[0, inf)")
    knn_k: int = _f(3, "Kozachenko-Leonenko entropy: the k-th neighbour distance", range="[1, inf)")
    rankme_eps: float = _f(1e-7, "RankMe: eps added to the normalised singular values", range="[0, inf)")
    rankme_center: bool = _f(False, "RankMe on centred embeddings (paper: no)")
    alpha_fit_range: tuple[float, float] = _f((0.0, 0.5), "alpha-ReQ: fit ranks / numerical rank", range="[0, 1]")
    lidar_images: int = _f(1000, "LiDAR: n images (surrogate classes), >= 2; 0 = skip", range="[0, inf)")
    lidar_views: int = _f(4, "LiDAR: q augmented views per image", range="[2, inf)")
    lidar_delta: float = _f(1e-4, "LiDAR: delta I added to Sigma_w", range="[0, inf)")
    # label-based references
    probe: str = _f("auto", "probe accuracy source (auto: probe.csv if complete, else knn)",
                    choices=("auto", "csv", "knn", "none"))
    probe_csv: tuple[str, ...] = _f(("linear:top1", "knn:top1_cosine_k20", "knn:top1"),
                                    "probe.csv rows to use as probe:metric, in order of preference")
    test_samples: int = _f(5000, "labelled test images for the k-NN probe (0 = all)", range="[0, inf)")
    skip_early: int = _f(1, "correlations also without the first N checkpoints", range="[0, inf)")
    # system
    batch_size: int = _f(256, "feature-extraction batch size", range="[1, inf)")
    threads: int = _f(1, "CPU threads for torch and scikit-learn (0 = their defaults)", range="[0, inf)")
    workers: int = _f(0, "data-loader workers", range="[0, inf)")
    precision: str = _f("fp32", "feature-extraction precision", choices=("fp32", "bf16"))
    cache_gb: float = _f(2.0, "cache each transformed image set up to this size (0 = off)", range="[0, inf)")
    skip_damaged: bool = _f(False, "skip unreadable checkpoints with a warning instead of stopping")
    benchmark: int = _f(0, "time the metric set on N x 512 embeddings (0 = off)", range="[0, inf)")

PRESETS = {"quick": {"max_samples": 2000, "lidar_images": 200, "lidar_views": 2, "kmeans_n_init": 1,
                     "test_samples": 1000}}  # a CPU smoke test: small LiDAR, one k-means restart

# the metrics correlated with the probe accuracy and plotted (ami_gt is the paper's label-based reference)
MONITORED = ("silhouette", "agreement", "entropy_gaussian", "entropy_knn", "rankme", "alpha_req", "lidar",
             "intrinsic_dimension", "ami_gt")
# monitor.csv's `unit` column ("" = dimensionless: scores in [-1, 1], effective ranks, exponents, dimensions)
UNITS = {"entropy_gaussian": "nats", "entropy_knn": "nats", "probe_acc": "%"}
COLUMNS = ["checkpoint", "epoch", "method", "features", "precision", "metric", "value", "unit", "note"]

# flags of earlier versions, refused with the command that replaces them (nothing is silently ignored)
_ANALYZE = "the paper analyses are subcommands of their method files now: python resa.py analyze RUN_DIR, " \
           "python excb.py analyze RUN_DIR"
MOVED = {"--analysis": _ANALYZE, "--ridge-lambda": "the ridge probe was removed: use --probe knn or --probe csv",
         **{f"--{old}": f"use python {f}.py analyze RUN_DIR --{new}" for f, old, new in [
             ("resa", "resa-split", "split"), ("resa", "resa-metric", "metric"), ("excb", "excb-bn", "bn"),
             ("excb", "excb-samples", "samples"), ("excb", "tsne-classes", "tsne-classes"),
             ("excb", "tsne-per-class", "tsne-per-class")]}}


def parse(argv=None):
    """common.parse_args; RUN_DIR may come first; removed flags and unusable counts are usage errors (exit 2)."""
    argv = common.path_first(argv, "--run-dir")
    for i, a in enumerate(argv):
        flag, _, value = a.partition("=")
        if flag in MOVED:
            raise common.UsageError(f"argument {flag}: removed; {MOVED[flag]}")
        if flag == "--probe" and (value or argv[i + 1 if i + 1 < len(argv) else i]) == "ridge":
            raise common.UsageError("argument --probe: the ridge probe was removed; use --probe knn (weighted "
                                    "20-NN, common.knn_accuracy) or --probe csv (run python probe.py RUN_DIR)")
    args = common.parse_args(Args, PRESETS, argv, usage="python monitor.py RUN_DIR [--flag VALUE ...]")
    if not (args.run_dir or args.benchmark):
        raise common.UsageError("give a run directory: python monitor.py RUN_DIR")
    check_sizes(args, args.n_clusters or (10 if args.benchmark else 2))
    return args


def check_sizes(args, n_clusters):
    """Usage errors (exit 2) for counts a metric cannot work with: K = 1, one LiDAR image, fewer rows than
    k-means with K clusters and its silhouette (K + 1), the k-NN entropy (k + 1), the k-NN probe (20) or TwoNN."""
    if args.n_clusters == 1 or args.lidar_images == 1:
        flag = "--n-clusters" if args.n_clusters == 1 else "--lidar-images"
        raise common.UsageError(f"argument {flag}: 1 is too few (a clustering and LiDAR need >= 2; 0 = "
                                f"{'the dataset classes' if flag == '--n-clusters' else 'skip LiDAR'})")
    need = max((n_clusters + 1, f"k-means with K={n_clusters} and its silhouette"), (3, "TwoNN"),
               (args.knn_k + 1 if "knn" in args.entropy else 0, f"the k-NN entropy with --knn-k {args.knn_k}"),
               (20 * (args.probe in ("auto", "knn") and not args.benchmark), "the k-NN probe (20 neighbours)"))
    for flag in ("--max-samples", "--silhouette-samples", "--benchmark"):
        n = getattr(args, flag[2:].replace("-", "_"))
        if 0 < n < (n_clusters + 1 if flag == "--silhouette-samples" else need[0]):
            raise common.UsageError(f"argument {flag}: {n} rows are too few for {need[1]}; give >= {need[0]} "
                                    f"(or 0 = all)")


# ===================================== METRIC SET: every label-free metric of one embedding ====================
def label_free_metrics(x, n_clusters, args, x_aug=None, views=None, timings=None):
    """All label-free metrics of x (N, D); x_aug (N, D): an augmented view of each image (pairing "views"); views
    (n, q, D): LiDAR's. -> ({metric: (value, note)}, C_1); timings[timer] += (wall, CPU) seconds."""
    timings = {} if timings is None else timings
    out, progress = {}, common.Progress("metric set", 9, "metrics")
    def timed(name, fn, note=None, timer=None):  # fn()'s value, kept as out[name] when it has a note
        t, c = time.perf_counter(), time.process_time()
        value = fn()
        w0, c0 = timings.get(timer or name, (0.0, 0.0))
        timings[timer or name] = (w0 + time.perf_counter() - t, c0 + time.process_time() - c)
        progress.update(1)
        if note is not None:
            out[name] = (value, note)
        return value
    c1 = timed("kmeans+silhouette", lambda: kmeans_labels(x, n_clusters, args.seed, args.kmeans_n_init))
    timed("silhouette", lambda: silhouette(x, c1, args.silhouette_samples or None, args.seed),
          f"K={n_clusters}, euclidean", "kmeans+silhouette")
    # Sec. "clustering agreement": AMI(C_1; C_2), C_2 from the augmented view or from a second k-means seed
    views_pairing = args.pairing == "views" and x_aug is not None
    x_b, seed_b = (x_aug, args.seed) if views_pairing else (x, args.seed + 1)
    timed("agreement", lambda: clustering_agreement(x, x_b, n_clusters, args.seed, seed_b, args.kmeans_n_init, c1),
          f"AMI, pairing={'views' if views_pairing else 'seeds'}, K={n_clusters}")
    for est in args.entropy:  # H(Z_3), by each estimator asked for
        timed(f"entropy_{est}", lambda: embedding_entropy(x, est, args.entropy_eps, args.knn_k),
              f"eps={args.entropy_eps:g}" if est == "gaussian" else f"k={args.knn_k}")
    timed("rankme", lambda: rankme(x, args.rankme_eps, args.rankme_center),
          f"eps={args.rankme_eps:g}, center={args.rankme_center}")
    a = timed("alpha_req", lambda: alpha_req(x, args.alpha_fit_range))
    note = f"fit ranks {a['fit_lo']}-{a['fit_hi']}"
    out["alpha_req"], out["alpha_req_r2"] = (a["alpha"], note), (a["r2"], note)
    if views is not None:
        timed("lidar", lambda: lidar(views, args.lidar_delta),
              f"n={views.shape[0]}, q={views.shape[1]}, delta={args.lidar_delta:g}")
    timed("intrinsic_dimension", lambda: intrinsic_dimension(x), "TwoNN MLE, distinct rows")
    return out, c1


def read_probe_csv(path, preference, dataset=None):
    """probe.py's probe.csv -> ({epoch: value}, "probe metric") for the first "probe:metric" of `preference` with
    rows on backbone features of the run's own dataset (not a transfer); ({}, None) when none has."""
    if not Path(path).is_file():
        return {}, None
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("features") in (None, "", "backbone")
                and (dataset is None or r.get("dataset") in (None, "", dataset))]
    for want in preference:
        probe, _, metric = want.partition(":")
        hits = {int(float(r["epoch"])): float(r["value"]) for r in rows
                if r.get("probe") == probe and r.get("metric") == (metric or "top1") and r.get("value")}
        if hits:
            return hits, f"{probe} {metric or 'top1'}"
    return {}, None


# ===================================== FEATURES: checkpoints -> embeddings of clean and augmented images =======
class _Views(torch.utils.data.Dataset):
    """q augmented views of the first n images of `base` (index j -> image j // q, view j % q)."""
    def __init__(self, base, transform, n_views=1, n_images=None):
        self.base = copy.copy(base)  # same images and subset (common.ImageDataset), raw: no eval transform
        self.base.transform = None
        self.transform, self.q, self.n = transform, n_views, min(n_images or len(base), len(base))

    def __len__(self):
        return self.n * self.q

    def __getitem__(self, j):
        image, label = self.base[j // self.q]
        return self.transform(image), label


class Data:
    """The run's images (from the first checkpoint). our choice 5: each set is transformed once, on one thread,
    from a fixed seed and kept up to --cache-gb (above: redone per checkpoint from the same seed): same views."""
    def __init__(self, meta, args):
        self.meta, self.args = meta, args

    @functools.cache  # one loader per (split, subset, kind, views, seed), for the whole run
    def loader(self, split, subset, kind="clean", n_views=1, n_images=None, seed=0):
        a, d = self.args, self.meta["data"]
        dl = functools.partial(torch.utils.data.DataLoader, batch_size=a.batch_size, num_workers=a.workers)
        loader = common.eval_loader(self.meta, split, a.data_dir or None, a.batch_size, a.workers, subset=subset)
        size = int(d["image_size"])
        if kind == "aug":
            aug = common.Augment(size, scale=a.view_scale, mean=d["mean"], std=d["std"])
            loader = dl(_Views(loader.dataset, aug, n_views, n_images))
        if len(loader.dataset) * 3 * size * size * 4 <= a.cache_gb * 2**30:
            with common.cpu_threads(1), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x, y = zip(*loader)
            loader = dl(torch.utils.data.TensorDataset(torch.cat(x), torch.cat(y)))
        return loader


def embed(backbone, heads, loader, device, feature_sets, seed=0, precision="fp32"):
    """Features of a loader -> ({"backbone": (N, D), "projector": (N, D')}, labels (N,)). The RNG is seeded once
    per pass (workers draw their seeds from it), so uncached views are the same for every checkpoint too."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        h, y = common.extract_features(backbone, loader, device, precision, what="embeddings")
    out = {"backbone": h}
    if "projector" in feature_sets:  # the head on the backbone features, in eval mode, on the head's device
        with torch.inference_mode():
            z = heads["projector"].eval()(h.to(device)).float().cpu()  # (N, D')
        out["projector"] = F.normalize(z, dim=1) if heads.get("normalize_output") else z
    return out, y


def load_checkpoint(path, device):
    """-> (backbone on device, heads on device, meta) from one file, read once."""
    ckpt = common.load_checkpoint(path)
    backbone, meta = common.load_backbone(ckpt)
    heads = {k: v.to(device) if isinstance(v, nn.Module) else v for k, v in common.load_heads(ckpt).items()}
    return backbone.to(device), heads, {**meta, "path": str(path)}


def validate_checkpoints(paths, skip_damaged):
    """Read every checkpoint first: a damaged or empty one stops the run or is skipped. -> (paths, metas)"""
    good, metas = [], []
    for p in paths:
        try:
            metas.append(common.checkpoint_meta(common.load_checkpoint(p), p))
            good.append(p)
        except common.CheckpointError as e:  # also a zero-byte file (common.load_checkpoint)
            why = f"{p} is empty (0 bytes)" if p.stat().st_size == 0 else str(e).rstrip(".")
            if not skip_damaged:
                raise common.CheckpointError(f"{why}; pass --skip-damaged to monitor the other checkpoints")
            print(f"warning: skipping {p}: {why}", file=sys.stderr)
    if not good:
        raise common.CheckpointError(f"no readable checkpoint among {len(paths)} file(s) in {paths[0].parent}")
    return good, metas


# ===================================== OUTPUTS: every file through a temporary name, figures ===================
def save(path, write):
    """write(tmp), then os.replace: a full disk leaves the previous file intact, one line naming it, exit 1."""
    try:
        common.write_atomic(path, write)
    except OSError as e:
        sys.exit(f"error: cannot write {path} ({e.strerror or type(e).__name__}); the previous file is "
                 f"unchanged: free space there or pass another --out-dir")
    return path.name


def plot(series, x, title, path, epochs=None, corr=None):
    """One panel per metric against epoch (epochs None), or against the probe accuracy x (colour: epoch)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    ncols, nrows = min(4, max(len(series), 1)), max(1, math.ceil(len(series) / 4))
    width, height = 3.3 * ncols, 3.0 * nrows + 0.7
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=0.8 / width, right=1 - (0.9 if epochs else 0.2) / width, bottom=0.5 / height,
                        top=1 - 0.8 / height, wspace=0.45, hspace=0.8)  # fixed margins: layout engines are slow
    for ax in axes.flat[len(series):]:
        ax.axis("off")
    for ax, (name, vals) in zip(axes.flat, series.items()):
        ax.set_ylabel(UNITS.get(name) or "dimensionless", fontsize=8)
        ax.tick_params(labelsize=7)
        label = name
        if epochs is None:
            ax.plot(x, vals, "o-", ms=3)
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            sc = ax.scatter(x, vals, c=epochs, cmap="viridis", s=18)
            ax.set_xlabel("probe accuracy (%)", fontsize=8)
            rs = [corr[name][k] for k in ("pearson", "spearman", "kendall")]
            label += ("\nneeds >= 3 checkpoints" if corr[name]["n"] < 3 else "\nconstant: no correlation"
                      if not np.isfinite(rs).all() else "\nr={:.2f} rho={:.2f} tau={:.2f}".format(*rs))
        if not np.isfinite(vals).any():
            ax.text(0.5, 0.5, "no finite value", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_title(label, fontsize=8)
    if epochs is not None:
        fig.colorbar(sc, cax=fig.add_axes([1 - 0.7 / width, 0.3, 0.012, 0.4]), label="epoch",
                     ticks=MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=10)
    name = save(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return name


def report(rows, names, epochs, feature_sets, probe_note, skip_early, title, out):
    """Correlations with the probe, monitor_correlations.csv, 2 figures per feature set -> (rows, files)."""
    table = {(r["checkpoint"], r["features"], r["metric"]): r["value"] for r in rows}
    def series_of(metric, features):  # one value per checkpoint, NaN where it was not computed
        return [table.get((c, features, metric), float("nan")) for c in names]
    probe, corr_rows, written = series_of("probe_acc", "backbone"), [], []
    for fs in feature_sets:
        series = {m: series_of(m, fs) for m in MONITORED if any(k[1:] == (fs, m) for k in table)}
        corr = {m: correlation_report(vals, probe) for m, vals in series.items()}  # all checkpoints: the figures
        corr_rows += [{"features": fs, "metric": m, "kind": "label-based" if m == "ami_gt" else "label-free",
                       "skip_early": skip, **correlation_report(vals, probe, skip)}
                      for m, vals in series.items() for skip in sorted({0, skip_early})]
        fig_title = f"{title}: {fs} features, {len(names)} checkpoint(s)"
        with_probe = {**series, "probe_acc": probe} if np.isfinite(probe).any() else series
        written.append(plot(with_probe, epochs, fig_title, out / f"monitor_epoch_{fs}.png"))
        if np.isfinite(probe).sum() >= 2:
            written.append(plot(series, probe, f"{fig_title}; probe: {probe_note}",
                                out / f"monitor_probe_{fs}.png", epochs, corr))
    columns = ["features", "metric", "kind", "skip_early", "n", "pearson", "spearman", "kendall"]
    written.append(save(out / "monitor_correlations.csv", lambda tmp: common.write_csv(tmp, corr_rows, columns)))
    return corr_rows, written


# ===================================== MAIN: every checkpoint -> monitor.csv, correlations, plots ==============
def benchmark(args):
    """--benchmark N: the CLI's metric set (same flags) on N x 512 synthetic clustered embeddings -> seconds."""
    g = torch.Generator().manual_seed(args.seed)
    n, d, k = args.benchmark, 512, args.n_clusters or 10
    x = (3.0 * torch.randn(k, d, generator=g))[torch.arange(n) % k] + torch.randn(n, d, generator=g)
    xs = x[torch.randperm(n, generator=g)[:args.max_samples or n]]
    x_aug = xs + 0.5 * torch.randn(xs.shape, generator=g)
    ni = min(args.lidar_images, len(xs))
    views = xs[:ni, None] + 0.5 * torch.randn(ni, args.lidar_views, d, generator=g) if ni else None
    timings, t, c = {}, time.perf_counter(), time.process_time()
    label_free_metrics(xs, k, args, x_aug, views, timings)
    timings["total"] = (time.perf_counter() - t, time.process_time() - c)
    print(f"benchmark: {n} x {d} embeddings, {len(xs)} rows used (--max-samples {args.max_samples}), K={k}, "
          f"pairing={args.pairing}, LiDAR {ni} x {args.lidar_views} views, {torch.get_num_threads()} thread(s)")
    print(f"  {'metric':<20s} {'wall s':>8s} {'CPU s':>8s}")
    for name, (wall, cpu) in timings.items():
        print(f"  {name:<20s} {wall:8.2f} {cpu:8.2f}")
    return timings


def main(argv=None):
    args = parse(argv)
    with common.cpu_threads(args.threads):
        (benchmark if args.benchmark else monitor_run)(args)


def monitor_checkpoint(path, args, data, device, feature_sets, probe):
    """One checkpoint -> (its monitor.csv rows, images used); probe = (mode, {epoch: probe.csv value}, note)"""
    backbone, heads, meta = load_checkpoint(path, device)
    epoch, rows, (probe_mode, csv_acc, probe_note) = int(meta["epoch"]), [], probe
    def add(features, metric, value, note=""):  # one monitor.csv row, in COLUMNS' order
        rows.append(dict(zip(COLUMNS, (path.name, epoch, meta["method"], features, args.precision, metric, value,
                                       UNITS.get(metric, ""), note))))
    def features(split, n, kind="clean", *views, seed=0, sets=feature_sets):
        return embed(backbone, heads, data.loader(split, n, kind, *views, seed=seed), device, sets, seed,
                     args.precision)
    train, y = features("train", args.max_samples)
    labelled = bool((y >= 0).all()) and len(torch.unique(y)) >= 2
    n_clusters = args.n_clusters or int(meta["data"].get("num_classes") or 0) or \
        (len(torch.unique(y)) if labelled else 10)
    check_sizes(args, n_clusters)  # K known only now for a folder dataset; else already checked
    aug = features("train", args.max_samples, "aug", seed=args.seed)[0] if args.pairing == "views" else None
    views = features("train", args.max_samples, "aug", args.lidar_views, args.lidar_images,
                     seed=args.seed + 1)[0] if args.lidar_images else None
    n_used = {"train": len(y), "lidar_images": 0 if views is None else len(views["backbone"]) // args.lidar_views}
    for fs in feature_sets:
        v = None if views is None else views[fs].reshape(-1, args.lidar_views, views[fs].shape[1])
        metrics, c1 = label_free_metrics(train[fs], n_clusters, args, None if aug is None else aug[fs], v)
        for name, (value, note) in metrics.items():
            add(fs, name, value, note)
        if labelled:  # label-based reference of the paper: AMI(C_1; C_GT)
            add(fs, "ami_gt", float(adjusted_mutual_info_score(y.numpy(), c1)), f"AMI vs labels, K={n_clusters}")
    acc = csv_acc.get(epoch, float("nan")) if probe_mode == "csv" else float("nan")
    if probe_mode == "csv" and epoch not in csv_acc:
        print(f"warning: probe.csv has no {probe_note} row for epoch {epoch}", file=sys.stderr)
    elif probe_mode == "knn" and labelled:
        try:
            test, test_y = features("test", args.test_samples, sets=["backbone"])
            acc, n_used["test"] = common.knn_accuracy(train["backbone"], y, test["backbone"], test_y), len(test_y)
        except common.DatasetNotFoundError as e:  # e.g. an ImageFolder without val/: no k-NN probe
            print(f"warning: no labelled test split, so no k-NN probe ({e})", file=sys.stderr)
    if probe_mode != "none":
        add("backbone", "probe_acc", acc, probe_note)
    return rows, n_used


def monitor_run(args):
    """Every checkpoint of args.run_dir -> monitor.csv, correlations, plots; all checks before the first feature"""
    t_start, run_dir = time.perf_counter(), common.run_dir_of(args.run_dir)
    paths, metas = validate_checkpoints(common.list_checkpoints(args.run_dir), args.skip_damaged)
    out = Path(args.out_dir or run_dir)  # tried before any work: an OSError is common.run's line (--out-dir)
    out.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=out).close()  # O_TMPFILE: nothing visible, no data (a full disk: save's line)
    meta0, epochs = metas[0], [int(m["epoch"]) for m in metas]
    check_sizes(args, args.n_clusters or int(meta0["data"].get("num_classes") or 0) or 2)
    has_proj = all("projector" in m["heads"] for m in metas)  # projector only when every checkpoint stores one
    if args.features == "projector" and not has_proj:
        raise common.UsageError(f"--features projector needs checkpoints with a 'projector' head; "
                                f"{paths[0]} stores {meta0['heads'] or 'no heads'}")
    feature_sets = {"backbone": ["backbone"], "projector": ["projector"],
                    "all": ["backbone"] + (["projector"] if has_proj else [])}[args.features]
    # the probe accuracy: auto = probe.py's probe.csv when it covers every checkpoint, else the k-NN probe
    csv_acc, csv_name = read_probe_csv(run_dir / "probe.csv", args.probe_csv, meta0["data"]["dataset"])
    mode = args.probe if args.probe != "auto" else "csv" if csv_acc and set(epochs) <= set(csv_acc) else "knn"
    if mode == "csv" and not csv_acc:
        raise common.UsageError(f"--probe csv: no row of {list(args.probe_csv)} in {run_dir / 'probe.csv'}; run "
                                f"`python probe.py {run_dir}` first or use --probe knn")
    probe = (mode, csv_acc, {"csv": f"probe.csv {csv_name}", "none": "",
                             "knn": "k-NN probe (common.knn_accuracy: cosine, k=20, T=0.07)"}[mode])
    device, data, rows = common.select_device(), Data(meta0, args), []
    progress = common.Progress("monitor", len(paths), "checkpoints")
    for path in paths:
        t0 = time.perf_counter()
        new, n_used = monitor_checkpoint(path, args, data, device, feature_sets, probe)
        rows += new
        line = " ".join(f"{r['features'][0]}/{r['metric']}={r['value']:.4g}" for r in new
                        if r["metric"] in MONITORED + ("probe_acc",))
        print(f"[monitor] epoch {new[0]['epoch']} ({path.name}, {time.perf_counter() - t0:.1f} s): {line}",
              flush=True)
        progress.update(1)
    # ---- outputs: monitor.csv first (the one that matters), then correlations, figures, the configuration ------
    written = [save(out / "monitor.csv", lambda tmp: common.write_csv(tmp, rows, COLUMNS))]
    corr_rows, files = report(rows, [p.name for p in paths], epochs, feature_sets, probe[2], args.skip_early,
                              f"run {run_dir.name} ({metas[-1]['method']})", out)
    config = {"args": asdict(args), "checkpoints": [str(p) for p in paths], "epochs": epochs,
              "features": feature_sets, "probe": probe[2], "samples": n_used, "device": str(device),
              "seconds": round(time.perf_counter() - t_start, 1)}
    written += files + [save(out / "monitor_config.json",
                             lambda tmp: tmp.write_text(json.dumps(config, indent=1, default=str)))]
    corr_rows = corr_rows if len(epochs) >= 3 and probe[0] != "none" else []
    print(f"[monitor] correlation with the probe accuracy ({probe[2]}) across {len(epochs)} checkpoints:"
          if corr_rows else f"[monitor] {len(epochs)} checkpoint(s): no correlation (needs 3 and a probe)")
    for c in corr_rows:
        print(f"  {c['features']:<9s} {c['metric']:<19s} skip {c['skip_early']}: n={c['n']} r={c['pearson']:.3f} "
              f"rho={c['spearman']:.3f} tau={c['kendall']:.3f}")
    print(f"[monitor] wrote {', '.join(written)} to {out} in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    common.run(main)
