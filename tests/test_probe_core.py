"""probe.py's probes on feature tensors against slow references, scikit-learn and NSCL's numbers."""
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import probe  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _blobs(n, d, c, spread=1.0, seed=0, scale=None):
    """Gaussian classes around random means: (n, d) float32, labels (n,) covering all c classes."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(c, d, generator=g) * spread
    y = torch.arange(n) % c
    y = y[torch.randperm(n, generator=g)]
    noise = torch.randn(n, d, generator=g) * (scale if scale is not None else 1.0)
    return mu[y] + noise, y


# ----- k-NN (common.knn_predict / knn_accuracy: the k-NN probe of probe.py and monitor.py) -------------------


def _knn_slow(train_x, train_y, test_x, k, T, metric, C):
    """One test image at a time, full sort, explicit vote: the definition, no chunking or matmul trick."""
    preds = []
    for q in test_x:
        if metric == "cosine":
            sims = [float(F.cosine_similarity(q, t, dim=0)) for t in train_x]
            order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
            votes = [0.0] * C
            for i in order:
                votes[int(train_y[i])] += math.exp(sims[i] / T)
        else:
            dists = [float(((q - t) ** 2).sum()) for t in train_x]
            order = sorted(range(len(dists)), key=lambda i: dists[i])[:k]
            votes = [0.0] * C
            for i in order:
                votes[int(train_y[i])] += 1.0
        preds.append(max(range(C), key=lambda c: (votes[c], -c)))  # ties -> smallest label
    return torch.tensor(preds)


@pytest.mark.parametrize("metric,k", [("cosine", 20), ("euclidean", 5)])
def test_knn_matches_slow_reference(metric, k):
    x, y = _blobs(300, 6, 5, spread=0.7, seed=1)
    tx, ty = x[:240], y[:240]
    qx = x[240:].double()
    pred = common.knn_predict(tx.double(), ty, qx, k=k, temperature=0.07, metric=metric,
                             chunk_elems=240 * 7).argmax(1)  # 7 test rows per chunk: several chunks
    assert torch.equal(pred, _knn_slow(tx.double(), ty, qx, k, 0.07, metric, 5))


def test_knn_euclidean_matches_sklearn_with_vote_ties():
    from sklearn.neighbors import KNeighborsClassifier

    # 7 classes, k=5, 2-d overlapping blobs: many 2-2-1 vote ties, which both break to the smallest label.
    x, y = _blobs(1200, 2, 7, spread=0.5, seed=2)
    tx, ty, qx, qy = x[:1000].double(), y[:1000], x[1000:].double(), y[1000:]
    ours = common.knn_predict(tx, ty, qx, k=5, metric="euclidean").argmax(1)
    with threadpool_limits(1):
        ref = KNeighborsClassifier(n_neighbors=5).fit(tx.numpy(), ty.numpy()).predict(qx.numpy())
    assert (ours.numpy() == ref).all()
    acc = common.knn_accuracy(tx, ty, qx, qy, k=5, metric="euclidean")
    assert acc == pytest.approx(100 * (ref == qy.numpy()).mean())


# ----- linear probe -----------------------------------------------------------------------------------


def _sklearn_acc(xa, ya, xb, yb):
    from sklearn.linear_model import LogisticRegression

    with threadpool_limits(1):  # lbfgs on 2 shared cores: OpenMP contention made it 50x slower
        clf = LogisticRegression(max_iter=5000).fit(xa.numpy(), ya.numpy())
        return 100 * clf.score(xb.numpy(), yb.numpy())


def test_linear_probe_separable_synthetic_matches_sklearn():
    x, y = _blobs(3000, 32, 10, spread=3.0, seed=3)
    ours = probe.linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], epochs=100)
    ref = _sklearn_acc(x[:2000], y[:2000], x[2000:], y[2000:])
    assert ref > 99 and ours["top1"] >= ref - 1
    assert ours["top5"] == 100.0


def test_linear_probe_digits_pixels_matches_sklearn():
    """The full ReSA protocol (500 epochs, lr 1e-2 -> 1e-6) on raw 8x8 digit pixels (values 0..16)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xa, xb, ya, yb = (torch.tensor(a) for a in train_test_split(
        d.data.astype("float32"), d.target, test_size=0.2, stratify=d.target, random_state=0))
    ours = probe.linear_probe(xa, ya, xb, yb)
    ref = _sklearn_acc(xa, ya, xb, yb)
    assert ref > 94 and ours["top1"] >= ref - 1, (ours, ref)


# ----- few-shot: NCCC and the batched linear probe ----------------------------------------------------


def test_nccc_matches_direct_computation():
    x, y = _blobs(600, 8, 4, spread=1.0, seed=4)
    trx, try_, tex, tey = x[:400], y[:400], x[400:], y[400:]
    n, R = 5, 3
    rows = probe.few_shot(trx, try_, tex, tey, shots=(n,), repeats=R, probes=("nccc",), eval_train=False,
                          seed=7)
    idx = probe.sample_shots(try_, n, R, torch.Generator().manual_seed(7))  # the draw few_shot made
    accs, errs = [], []
    for r in range(R):
        assert all(set(try_[idx[r, c]].tolist()) == {c} for c in range(4))  # n images of each class
        assert len(set(idx[r].flatten().tolist())) == 4 * n  # distinct
        centres = torch.stack([trx[idx[r, c]].mean(0) for c in range(4)])
        d = torch.cdist(tex, centres)  # (M, C)
        accs.append(100 * (d.argmin(1) == tey).float().mean().item())
        pair = []
        for i, j in itertools.combinations(range(4), 2):
            m = (tey == i) | (tey == j)
            pred = torch.where(d[m, i] <= d[m, j], i, j)
            pair.append(100 * (pred != tey[m]).float().mean().item())
        errs.append(np.mean(pair))
    got = {r["probe"]: r for r in rows}
    assert got["nccc"]["values"] == pytest.approx(accs, abs=1e-4)
    assert got["nccc_2way_err"]["values"] == pytest.approx(errs, abs=1e-4)
    assert got["nccc"]["mean"] == pytest.approx(np.mean(accs), abs=1e-4)


def test_few_shot_linear_batched_equals_independent_repeats():
    """R probes trained as one (R, C, D) tensor = R separate Adam trainings with the same draws."""
    x, y = _blobs(200, 6, 3, spread=1.0, seed=5)
    R, n, C, D, epochs, lr, bs = 3, 10, 3, 6, 15, 3e-2, 8
    idx = probe.sample_shots(y, n, R, torch.Generator().manual_seed(0))
    xs = x[idx].flatten(1, 2)  # (R, C*n, D)
    ys = torch.arange(C).repeat_interleave(n).expand(R, -1).contiguous()
    g = torch.Generator().manual_seed(1)
    acc_batched = probe._few_shot_linear(xs, ys, [(x, y)], C, epochs, lr, bs, g)[0]

    g = torch.Generator().manual_seed(1)  # replay the generator: init, then one permutation per epoch
    W0 = (torch.rand(R, C, D, generator=g) * 2 - 1) / math.sqrt(D)
    perms = [torch.rand(R, C * n, generator=g).argsort(1) for _ in range(epochs)]
    for r in range(R):
        w = W0[r].clone().requires_grad_()
        opt = torch.optim.Adam([w], lr=lr)
        for p in perms:
            for s in range(0, C * n, bs):
                b = p[r, s:s + bs]
                loss = F.cross_entropy(xs[r, b] @ w.T, ys[r, b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        acc = 100 * ((x @ w.detach().T).argmax(1) == y).float().mean()
        assert acc_batched[r].item() == pytest.approx(acc.item(), abs=1e-4)


def test_few_shot_rows_and_skipped_shots():
    x, y = _blobs(300, 16, 3, spread=4.0, seed=6)
    rows = probe.few_shot(x[:150], y[:150], x[150:], y[150:], shots=(1, 5, 1000), repeats=2, epochs=100,
                          lr=1e-2)
    assert {r["shots"] for r in rows} == {1, 5}  # 1000 > 50 images per class: skipped
    lin = [r for r in rows if r["probe"] == "linear" and r["split"] == "test" and r["shots"] == 5][0]
    assert lin["mean"] > 95 and len(lin["values"]) == 2


# ----- CDNV, directional CDNV, the bound --------------------------------------------------------------


def _cdnv_slow(x, y):
    x, y = x.double().numpy(), y.numpy()
    cls = sorted(set(y.tolist()))
    mu = {c: x[y == c].mean(0) for c in cls}
    var = {c: ((x[y == c] - mu[c]) ** 2).sum(1).mean() for c in cls}
    cd = [(var[i] + var[j]) / (2 * ((mu[i] - mu[j]) ** 2).sum()) for i, j in itertools.combinations(cls, 2)]
    dcd = []
    for i, j in itertools.permutations(cls, 2):
        diff = mu[j] - mu[i]
        u = diff / np.linalg.norm(diff)
        dcd.append((((x[y == i] - mu[i]) @ u) ** 2).mean() / (diff ** 2).sum())
    return np.mean(cd), np.mean(dcd)


def test_cdnv_matches_slow_reference():
    x, y = _blobs(500, 12, 6, spread=1.5, seed=8, scale=torch.rand(12) + 0.2)
    ref_cd, ref_dcd = _cdnv_slow(x, y)
    assert probe.cdnv(x, y) == pytest.approx(ref_cd, rel=1e-6)
    assert probe.directional_cdnv(x, y, chunk=37) == pytest.approx(ref_dcd, rel=1e-6)  # several chunks


def test_cdnv_invariant_to_scale_and_translation():
    x, y = _blobs(400, 10, 5, spread=1.0, seed=9)
    shift = torch.randn(10) * 1000  # far from the origin: E||x||^2 - ||mu||^2 would lose digits here
    for f in (probe.cdnv, probe.directional_cdnv):
        base = f(x, y)
        assert f(7.5 * x, y) == pytest.approx(base, rel=1e-6)
        assert f(x.double() + shift.double(), y) == pytest.approx(base, rel=1e-6)
        assert f(x + shift, y) == pytest.approx(base, rel=1e-3)  # float32 input: storage rounding only


@pytest.mark.parametrize("seed", range(5))
def test_mean_directional_cdnv_at_most_mean_cdnv(seed):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(20, generator=g) * 3  # anisotropic classes
    spread = float(torch.rand(1, generator=g)) * 2 + 0.1
    x, y = _blobs(600, 20, 2 + seed * 2, spread=spread, seed=seed, scale=scale)
    assert probe.directional_cdnv(x, y) <= probe.cdnv(x, y) + 1e-12


def test_few_shot_bound_reference_values():
    # NSCL follow-up notebook values (shared/specs/nscl_monitor.md A8), 2-way: C' - 1 = 1.
    ref = {1: 29.114, 5: 8.196, 10: 5.666, 20: 4.167, 50: 2.945, 100: 2.335, 200: 1.886, 500: 1.459}
    for m, v in ref.items():
        assert probe.few_shot_bound(0.0728605, 1.6721367, m, n_classes=2) == pytest.approx(v, abs=5e-4)
    assert probe.few_shot_bound(0.0728605, 1.6721367, 5, n_classes=10) == pytest.approx(9 * 8.196, abs=5e-3)


def test_few_shot_bound_closed_form_is_the_minimum():
    """The Cardano / trigonometric root against a dense numeric search over a >= max(5, 2A + eps)."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        Vt, V, m = 10 ** rng.uniform(-3, 1), 10 ** rng.uniform(-2, 1.5), int(rng.choice([1, 2, 5, 20, 500]))
        A = 2 + 2 ** 1.5 / m
        B = 0.25 * ((2 / math.sqrt(m)) * (math.sqrt(V) + V) + V / m)
        a = max(5, 2 * A) * np.exp(np.linspace(1e-9, 9, 400001))
        grid = (Vt * (0.5 - A / a) ** -2 + B * a).min()
        got = probe.few_shot_bound(Vt, V, m)
        assert got <= grid * (1 + 1e-9) and got == pytest.approx(grid, rel=1e-6)
