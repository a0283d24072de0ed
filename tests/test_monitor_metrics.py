"""monitor.py's label-free metrics against scikit-learn, closed forms and their invariances (CPU, ~10 s)."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import monitor  # noqa: E402


def blobs(n=600, d=16, k=4, spread=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    return centres[y] + torch.randn(n, d, generator=g), y


def gaussian_with_cov(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    closed = 0.5 * d * math.log(2 * math.pi * math.e) + 0.5 * torch.logdet(cov).item()
    return x, closed


# ---- clustering metrics equal scikit-learn's on the same clustering ------------------------------------------

def test_kmeans_silhouette_equals_sklearn():
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x, _ = blobs()
    score = monitor.kmeans_silhouette(x, 4, seed=3)
    ref_labels = KMeans(4, n_init=3, random_state=3).fit_predict(x.numpy())
    assert np.array_equal(monitor.kmeans_labels(x, 4, seed=3), ref_labels)
    assert score == pytest.approx(silhouette_score(x.numpy(), ref_labels, metric="euclidean"), abs=1e-6)
    sub = monitor.kmeans_silhouette(x, 4, seed=3, sample_size=200)  # subset: same clustering, noisier score
    assert sub == pytest.approx(silhouette_score(x.numpy(), ref_labels, sample_size=200, random_state=3), abs=1e-6)
    assert score > 0.5  # well separated blobs


def test_silhouette_nan_when_collapsed():
    assert math.isnan(monitor.silhouette(torch.ones(50, 4), np.zeros(50, dtype=np.int64)))
    assert math.isnan(monitor.kmeans_silhouette(torch.ones(50, 4), 3, seed=0))  # all points identical


def test_clustering_agreement_equals_sklearn_ami():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_mutual_info_score

    x, _ = blobs(k=5, spread=1.0)
    g = torch.Generator().manual_seed(1)
    x_b = x + 0.5 * torch.randn(x.shape, generator=g)  # a noisy "view" of the same points
    ami = monitor.clustering_agreement(x, x_b, 5, seed=0)
    ref = adjusted_mutual_info_score(KMeans(5, n_init=3, random_state=0).fit_predict(x.numpy()),
                                     KMeans(5, n_init=3, random_state=0).fit_predict(x_b.numpy()))
    assert ami == pytest.approx(ref, abs=1e-12)
    seeds = monitor.clustering_agreement(x, x, 5, seed=0, seed_b=1)
    ref = adjusted_mutual_info_score(KMeans(5, n_init=3, random_state=0).fit_predict(x.numpy()),
                                     KMeans(5, n_init=3, random_state=1).fit_predict(x.numpy()))
    assert seeds == pytest.approx(ref, abs=1e-12)
    assert monitor.clustering_agreement(x, x, 5, seed=0) == pytest.approx(1.0)  # same data, same seed


def test_agreement_invariant_to_cluster_relabelling():
    x, _ = blobs()
    la = monitor.kmeans_labels(x, 4, seed=0)
    perm = np.array([2, 0, 3, 1])
    assert monitor.clustering_agreement(x, x, 4, seed=0, labels_a=perm[la]) == pytest.approx(1.0)


# ---- entropy ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [3, 8])
def test_gaussian_entropy_matches_closed_form(d):
    x, closed = gaussian_with_cov(20000, d, seed=d)
    # sampling sd of 1/2 log det S is ~ sqrt(d / (2N)) = 0.01 at d = 8: 0.05 is five sd
    assert monitor.embedding_entropy(x, "gaussian") == pytest.approx(closed, abs=0.05)


@pytest.mark.parametrize("d", [2, 4])
def test_knn_entropy_agrees_with_gaussian(d):
    x, closed = gaussian_with_cov(4000, d, seed=10 + d)
    knn = monitor.embedding_entropy(x, "knn")
    assert knn == pytest.approx(closed, abs=0.1)
    assert knn == pytest.approx(monitor.embedding_entropy(x, "gaussian"), abs=0.1)


def test_entropy_shift_and_scale():
    # H(x + b) = H(x); H(a x) = H(x) + D log a, for both estimators
    x, _ = gaussian_with_cov(2000, 4, seed=0)
    for est in ("gaussian", "knn"):
        h = monitor.embedding_entropy(x, est, eps=0.0)
        assert monitor.embedding_entropy(x + 7.0, est, eps=0.0) == pytest.approx(h, abs=1e-6)
        assert monitor.embedding_entropy(3.0 * x, est, eps=0.0) == pytest.approx(h + 4 * math.log(3.0), abs=1e-6)


def test_gaussian_entropy_finite_when_collapsed():
    x = torch.randn(100, 4) @ torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    h = monitor.embedding_entropy(x, "gaussian")
    assert math.isfinite(h) and h < monitor.embedding_entropy(torch.randn(100, 4), "gaussian") - 10
    with pytest.raises(ValueError, match="estimator"):
        monitor.embedding_entropy(x, "histogram")


# ---- RankMe, alpha-ReQ, LiDAR -------------------------------------------------------------------------------

def test_rankme_rank_r_and_isotropic():
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(64, 10, generator=g))[0]  # 10 orthonormal directions in R^64
    low = torch.randn(4000, 10, generator=g) @ q.T
    assert monitor.rankme(low) == pytest.approx(10, rel=0.02)
    iso = torch.randn(4000, 64, generator=g)
    assert monitor.rankme(iso) == pytest.approx(64, rel=0.03)
    assert monitor.rankme(torch.ones(100, 64)) == pytest.approx(1.0, abs=0.01)  # total collapse


def test_rankme_invariances():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 32, generator=g) * torch.linspace(0.1, 2.0, 32)
    r = monitor.rankme(x)
    assert monitor.rankme(x[torch.randperm(500, generator=g)]) == pytest.approx(r, rel=1e-9)  # rows
    rot = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0]
    assert monitor.rankme(x.double() @ rot) == pytest.approx(r, rel=1e-9)  # orthogonal map of the columns
    assert monitor.rankme(5.0 * x) == pytest.approx(r, rel=1e-6)  # global scale
    # not invariant to a mean offset unless centred: the offset adds one direction
    assert monitor.rankme(x + 100.0) < r
    assert monitor.rankme(x + 100.0, center=True) == pytest.approx(monitor.rankme(x, center=True), rel=1e-6)


def test_alpha_req_recovers_power_law():
    g = torch.Generator().manual_seed(0)
    k = torch.arange(1, 65, dtype=torch.float64)
    for alpha in (0.5, 1.0, 2.0):
        x = torch.randn(40000, 64, generator=g, dtype=torch.float64) * k.pow(-alpha / 2)
        out = monitor.alpha_req(x)
        assert out["alpha"] == pytest.approx(alpha, abs=0.05)
        assert out["r2"] > 0.99 and (out["fit_lo"], out["fit_hi"]) == (1, 32)
    assert monitor.alpha_req(5 * x)["alpha"] == pytest.approx(out["alpha"], abs=1e-9)  # scale-free


@pytest.mark.parametrize("fit_range", [(0.0, 0.5), (0.1, 0.9), (0.0, 1.0)])
def test_alpha_req_numpy_fit_equals_scipy_linregress(fit_range):
    """The numpy least-squares line (scipy is not a dependency) gives scipy.stats.linregress's slope and R^2."""
    stats = pytest.importorskip("scipy.stats")  # installed with scikit-learn; only this reference needs it
    x, _ = blobs(n=500, d=24, k=6, spread=2.0, seed=1)
    out = monitor.alpha_req(x, fit_range)
    lam = monitor.covariance_spectrum(x)
    ref = stats.linregress(np.log(np.arange(out["fit_lo"], out["fit_hi"] + 1)),
                           lam[out["fit_lo"] - 1:out["fit_hi"]].log().numpy())
    assert out["alpha"] == pytest.approx(-ref.slope, abs=1e-10)
    assert out["r2"] == pytest.approx(ref.rvalue ** 2, abs=1e-10)


def test_lidar_identical_views_and_linear_invariance():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2000, 1, 8, generator=g)
    # identical views: Sigma_w = delta I, so LiDAR = RankMe-like rank of Sigma_b: ~ min(D, n - 1) = 8
    assert monitor.lidar(clean.expand(2000, 4, 8)) == pytest.approx(8, rel=0.02)
    assert 1.0 < monitor.lidar(clean[:5].expand(5, 4, 8)) <= 4.0 + 1e-6  # rank(Sigma_b) <= n - 1 = 4 < D
    views = clean[:500] + 0.3 * torch.randn(500, 4, 8, generator=g)
    a = torch.randn(8, 8, generator=g) + 3 * torch.eye(8)  # invertible
    # LDA is invariant to invertible linear maps (exactly at delta = 0)
    assert monitor.lidar(views @ a.T, delta=0.0) == pytest.approx(monitor.lidar(views, delta=0.0), rel=1e-6)
    with pytest.raises(ValueError, match="views"):
        monitor.lidar(torch.randn(10, 1, 8))


# ---- correlation report -------------------------------------------------------------------------------------

def test_correlation_report_monotone_gives_spearman_one():
    acc = np.array([10.0, 25.0, 31.0, 40.0, 52.0, 60.0, 61.0])
    metric = np.exp(acc / 10.0)  # monotone, not linear
    out = monitor.correlation_report(metric, acc)
    assert out["spearman"] == pytest.approx(1.0) and out["kendall"] == pytest.approx(1.0)
    assert 0.8 < out["pearson"] < 1.0 - 1e-6
    neg = monitor.correlation_report(-metric, acc, skip_early=2)
    assert neg["n"] == 5 and neg["spearman"] == pytest.approx(-1.0)


def test_correlation_report_degenerate_is_nan():
    out = monitor.correlation_report([1.0, 2.0], [3.0, 4.0])
    assert out["n"] == 2 and math.isnan(out["spearman"])
    assert math.isnan(monitor.correlation_report([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["pearson"])
    out = monitor.correlation_report([1.0, float("nan"), 3.0, 4.0], [1.0, 2.0, 3.0, 5.0])
    assert out["n"] == 3 and out["spearman"] == pytest.approx(1.0)


# ---- TwoNN intrinsic dimension ----------------------------------------------------------------------------------

def twonn_reference(x):
    """Slow reference: distinct rows, then for each point a loop over all others in float64."""
    x = np.unique(np.asarray(x, dtype=np.float32), axis=0).astype(np.float64)
    log_mu = []
    for i in range(len(x)):
        d = np.sort(np.sqrt(((np.delete(x, i, axis=0) - x[i]) ** 2).sum(1)))
        log_mu.append(math.log(d[1] / d[0]))
    return (len(x) - 1) / sum(log_mu)


def embedded(n, d, big, seed, uniform=False):
    """n points of a d-dimensional standard Gaussian (or uniform square) mapped linearly into `big` dimensions."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, d, generator=g) if uniform else torch.randn(n, d, generator=g)
    return z @ torch.randn(d, big, generator=g)


def test_intrinsic_dimension_equals_slow_reference():
    x = embedded(300, 4, 16, seed=1) + 0.05 * torch.randn(300, 16, generator=torch.Generator().manual_seed(2))
    assert monitor.intrinsic_dimension(x) == pytest.approx(twonn_reference(x), rel=1e-6)


def test_intrinsic_dimension_of_known_manifolds():
    # MLE standard error ~ d / sqrt(N): 0.11 for d = 5 and 0.045 for d = 2 at N = 2000; tolerances ~4.5 s.e.
    assert monitor.intrinsic_dimension(embedded(2000, 5, 64, seed=0)) == pytest.approx(5.0, abs=0.5)
    assert monitor.intrinsic_dimension(embedded(2000, 2, 10, seed=0, uniform=True)) == pytest.approx(2.0, abs=0.2)
    # invariant to rotation, translation and scale; not a rank: full-rank isotropic data give about D
    x = embedded(1000, 3, 8, seed=3)
    q = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(4)))[0]
    ref = monitor.intrinsic_dimension(x)
    assert monitor.intrinsic_dimension(3.0 * x @ q + 5.0) == pytest.approx(ref, rel=1e-3)
    assert monitor.intrinsic_dimension(torch.randn(2000, 8)) == pytest.approx(8.0, rel=0.15)


def test_intrinsic_dimension_with_duplicates_is_finite():
    x = embedded(500, 3, 16, seed=5)
    dup = torch.cat([x, x[:200], x[:50]])  # r1 = 0 for 250 points if duplicates were kept
    got = monitor.intrinsic_dimension(dup)
    assert math.isfinite(got) and got == pytest.approx(monitor.intrinsic_dimension(x), rel=1e-9)
    assert math.isnan(monitor.intrinsic_dimension(torch.ones(50, 4)))  # one distinct point: undefined
