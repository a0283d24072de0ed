"""ExCB method core (excb.py METHOD section) against slow references and its invariants. CPU, ~15 s."""
import copy
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import excb  # noqa: E402


def balance_reference(z, s):
    """Eq. (10) element by element, in float64 Python arithmetic."""
    K = len(s)
    out = torch.empty(z.shape, dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in z.shape]).view(-1, z.dim()).tolist():
        k, zz, sk = idx[-1], float(z[tuple(idx)]), float(s[idx[-1]]) * K
        out[tuple(idx)] = 1 - (1 - zz) * sk if sk < 1 else ((1 + zz) / sk - 1 if sk > 1 else zz)
    return out


# ----------------------------------------------------------------- balance, Eq. (10)
def test_balance_matches_eq10_on_both_branches():
    g = torch.Generator().manual_seed(0)
    K = 8
    s = torch.tensor([0.0, 0.02, 0.1, 0.125, 0.125, 0.2, 0.18, 0.25])  # sums to 1; 1/K = 0.125
    z = torch.rand(3, 5, K, generator=g) * 2 - 1
    zb = excb.balance(z, s)
    torch.testing.assert_close(zb.double(), balance_reference(z, s), rtol=0, atol=1e-6)
    assert (zb[..., 0] == 1).all()                       # s = 0: an empty cluster gets similarity exactly 1
    assert torch.equal(zb[..., 3:5], z[..., 3:5])        # s = 1/K: identity, bit for bit (K a power of 2)
    assert (zb[..., :3] > z[..., :3]).all() and (zb[..., 5:] < z[..., 5:]).all()


def test_balance_endpoints_uniform_identity_and_collapse():
    z = torch.linspace(-1, 1, 21)[:, None].expand(21, 64)
    torch.testing.assert_close(excb.balance(z, torch.full((64,), 1 / 64)), z, rtol=0, atol=0)
    s = torch.zeros(64)
    s[5] = 1.0                                            # collapse: one cluster holds every sample
    zb = excb.balance(z, s)
    torch.testing.assert_close(zb[:, 5], (1 + z[:, 5]) / 64 - 1, rtol=0, atol=1e-7)
    assert (zb[:, 5] <= -1 + 2 / 64 + 1e-7).all()         # -> -1 for large K
    assert (zb[:, torch.arange(64) != 5] == 1).all()      # every other (empty) cluster: exactly 1
    s3 = torch.full((3,), 1 / 3)                          # s = 1/K not representable: identity to 1 ulp
    torch.testing.assert_close(excb.balance(z[:, :3], s3), z[:, :3], rtol=0, atol=1e-6)


def test_balance_monotone_in_s_and_in_range():
    K = 16
    z = torch.linspace(-1, 1, 41)
    sizes = torch.linspace(0, 1, 201)                     # cluster 0's share; the others share the rest
    out = []
    for a in sizes:
        s = torch.cat([a[None], torch.full((K - 1,), (1 - a) / (K - 1))])
        out.append(excb.balance(z[:, None].expand(-1, K), s)[:, 0])
    out = torch.stack(out)                                # (201 sizes, 41 z)
    assert (out[1:] <= out[:-1] + 1e-6).all()             # decreasing in s
    assert (out[:, 1:] >= out[:, :-1] - 1e-6).all()       # increasing in z
    assert out.min() >= -1 and out.max() <= 1


def test_boost_top_and_teacher_targets():
    z = torch.tensor([[0.5, 0.2, -0.1], [0.995, 0.9, 0.0], [-0.3, -0.5, -0.4]])
    b = excb.boost_top(z, 1.01)
    torch.testing.assert_close(b, torch.tensor([[0.505, 0.2, -0.1], [1.0, 0.9, 0.0], [-0.303, -0.5, -0.4]]))
    s = torch.full((3,), 1 / 3)
    p_t, z_b = excb.teacher_targets(z[None], s, tau_t=0.04, boost=False)
    torch.testing.assert_close(p_t, F.softmax(z[None] / 0.04, -1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_t.sum(-1), torch.ones(1, 3))


# ----------------------------------------------------------------- s, Eq. (8)-(9)
def test_update_cluster_sizes_reference():
    g = torch.Generator().manual_seed(1)
    K, m = 6, 0.9
    s = torch.softmax(torch.randn(K, generator=g), 0)
    z_b = torch.randn(2, 7, K, generator=g)
    new = excb.update_cluster_sizes(s, z_b, m)
    s_B = [0.0] * K
    for v in range(2):
        for n in range(7):
            s_B[int(z_b[v, n].argmax())] += 1 / 14        # Eq. (8): hard assignments of both views
    ref = [m * float(s[k]) + (1 - m) * s_B[k] for k in range(K)]  # Eq. (9)
    torch.testing.assert_close(new.double(), torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-7)
    assert abs(float(new.sum()) - 1) < 1e-6


def _balancing_stream(balanced, K=16, B=128, steps=600, seed=0):
    """Teacher similarities where cluster 0 always wins by a margin -> the max relative size (size x K / N)
    of the teacher's hard assignments at the first step and over the last 100 steps."""
    g = torch.Generator().manual_seed(seed)
    s = torch.full((K,), 1 / K)
    first, last = torch.zeros(K), torch.zeros(K)
    for t in range(steps):
        z = torch.rand(2, B, K, generator=g) * 0.6 - 0.3
        z[..., 0] += 0.65                                 # cluster 0 is every sample's nearest centroid
        _, z_b = excb.teacher_targets(z, s if balanced else torch.full((K,), 1 / K), boost=True)
        s = excb.update_cluster_sizes(s, z_b, momentum=0.98)
        n = torch.bincount(z_b.argmax(-1).flatten(), minlength=K)
        first += n if t == 0 else 0
        last += n if t >= steps - 100 else 0
    return float(first.max() * K / first.sum()), float(last.max() * K / last.sum())


def test_balancing_breaks_a_collapsed_stream():
    assert _balancing_stream(balanced=False) == (16.0, 16.0)  # without B: every sample in cluster 0
    start, end = _balancing_stream(balanced=True)
    assert start == 16.0 and end < 1.6                 # with B: from collapsed (s uniform at step 0) to near
    # 1: a soft bound, as in Fig. 4(c); the winner settles where its pushed-down similarity ties the others


def _update_worker(rank, world, init_file, z_b, s, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    B = z_b.shape[1] // world
    new = excb.update_cluster_sizes(s, z_b[:, rank * B:(rank + 1) * B], 0.9)
    if rank == 0:
        torch.save(new, out)
    dist.destroy_process_group()


def test_update_cluster_sizes_two_gloo_ranks_equal_one_process():
    g = torch.Generator().manual_seed(2)
    K = 32
    z_b = torch.randn(2, 16, K, generator=g)
    s = torch.softmax(torch.randn(K, generator=g), 0)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "s.pt")
        mp.start_processes(_update_worker, args=(2, os.path.join(d, "init"), z_b, s, out), nprocs=2,
                           start_method="fork")
        torch.testing.assert_close(torch.load(out), excb.update_cluster_sizes(s, z_b, 0.9), rtol=0, atol=1e-7)


# ----------------------------------------------------------------- loss, Eq. (7), and gradient paths
def loss_reference(p_t, z_h, z_g, tau_s):
    """Eq. (7) with the official pairing, one image and one pair at a time."""
    terms = []
    G, B, K = p_t.shape
    for t in range(G):
        students = [z_h[1 - t]] + [z_g[v] for v in range(z_g.shape[0])]
        for zs in students:
            per_image = []
            for n in range(B):
                logp = zs[n] / tau_s - torch.logsumexp(zs[n] / tau_s, 0)
                per_image.append(-sum(p_t[t, n, k] * logp[k] for k in range(K)))
            terms.append(sum(per_image) / B)
    assert len(terms) == 2 * (1 + z_g.shape[0])
    return sum(terms) / len(terms)


@pytest.mark.parametrize("n_local", [0, 3])
def test_loss_and_gradients_match_reference(n_local):
    g = torch.Generator().manual_seed(3)
    K, B, V = 5, 4, 2 + n_local
    p_t = torch.softmax(torch.randn(2, B, K, generator=g) / 0.3, -1).double()
    z_h = (torch.rand(2, B, K, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    z_g = (torch.rand(V, B, K, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    loss = excb.excb_loss(p_t, z_h, z_g, 0.1)
    gh, gg = torch.autograd.grad(loss, (z_h, z_g))
    ref = loss_reference(p_t, z_h, z_g, 0.1)
    rh, rg = torch.autograd.grad(ref, (z_h, z_g))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gg, rg)


def tiny_net(K=7, seed=0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU())
    return excb.ExCBNet(backbone, 16, K, hidden=24, dim=8)


def test_gradient_paths_centroids_only_through_global_projector():
    student = tiny_net()
    teacher = tiny_net()
    teacher.predictor = None
    teacher.requires_grad_(False)
    B, K, L = 6, 7, 2
    x_g, x_l = torch.randn(2 * B, 12), torch.randn(L * B, 12)
    z_t = teacher(x_g)[0].view(2, B, K)
    p_t, _ = excb.teacher_targets(z_t, torch.full((K,), 1 / K))
    z_h, z_g = student(x_g, x_l)
    assert z_h.shape == (2 * B, K) and z_g.shape == ((2 + L) * B, K) and z_h.abs().max() <= 1 + 1e-6
    excb.excb_loss(p_t, z_h.view(2, B, K), z_g.view(2 + L, B, K)).backward()
    full = student.centroids.weight.grad.clone()
    assert full.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    assert student.predictor[1].weight.grad.abs().sum() > 0   # local crops train through the predictor
    # the projector path alone gives exactly the centroids' gradient; the predictor path gives none
    student.zero_grad(set_to_none=True)
    z_h, z_g = student(x_g, x_l)
    n_pairs = 2 + 2 * (2 + L)
    (-(p_t * F.log_softmax(z_h.view(2, B, K) / 0.1, -1).flip(0)).sum(-1).mean(-1).sum() / n_pairs).backward()
    torch.testing.assert_close(student.centroids.weight.grad, full)
    student.zero_grad(set_to_none=True)
    z_h, z_g = student(x_g, x_l)
    F.log_softmax(z_g / 0.1, -1).sum().backward()
    assert student.centroids.weight.grad is None and student.backbone[1].weight.grad.abs().sum() > 0


def test_ema_update_includes_centroids_and_skips_predictor():
    student, teacher = tiny_net(seed=0), tiny_net(seed=1)
    teacher.predictor = None
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    excb.ema_update(teacher, student, 0.9)
    sp = dict(student.named_parameters())
    assert "centroids.weight" in before and not any(n.startswith("predictor") for n in before)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * sp[n])


def test_centroid_layer_is_cosine_and_unit_rows():
    layer = excb.CentroidLayer(4, 3)
    x = torch.randn(5, 4) * 10
    z = layer(x)
    w = layer.weight.detach()
    ref = torch.tensor([[float(F.cosine_similarity(x[n], w[k], dim=0)) for k in range(3)] for n in range(5)])
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- k-means init
def test_kmeans_leaves_no_empty_cluster_and_returns_unit_centroids():
    g = torch.Generator().manual_seed(4)
    centers = F.normalize(torch.randn(10, 8, generator=g), dim=1)
    x = F.normalize(centers.repeat(30, 1) + 0.1 * torch.randn(300, 8, generator=g), dim=1)
    means, C = excb.spherical_kmeans(x, 40, iters=20, tries=10, seed=0)
    assert means.shape == C.shape == (40, 8)
    torch.testing.assert_close(C.norm(dim=1), torch.ones(40))
    torch.testing.assert_close(F.normalize(means, dim=1), C)
    assert torch.bincount((x @ C.T).argmax(1), minlength=40).min() > 0


def test_kmeans_impossible_k_fails_clearly():
    x = F.normalize(torch.randn(50, 8), dim=1)
    with pytest.raises(ValueError, match="K=50 clusters cannot all be non-empty with 50 samples"):
        excb.spherical_kmeans(x, 50)
    dup = F.normalize(torch.randn(3, 8), dim=1).repeat(20, 1)  # 60 samples but 3 distinct points
    with pytest.raises(RuntimeError, match="empty after 2 attempts"):
        excb.spherical_kmeans(dup, 10, iters=3, tries=2)


# ----------------------------------------------------------------- Fig. 4 diagnostics
def test_fig4_statistics():
    p_t = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]]])
    assert abs(float(excb.teacher_confidence(p_t)) - (0.7 + 0.8 + 0.6 + 0.5) / 4) < 1e-6   # Eq. (11)
    assert float(excb.view_agreement(p_t.log())) == 0.5                                   # Eq. (12)
    counts = torch.zeros(4, 2)
    excb.count_assignments(counts, p_t.log(), torch.tensor([0, 1]))
    torch.testing.assert_close(counts, torch.tensor([[2.0, 1.0], [0, 0], [0, 1.0], [0, 0]]))
    st = excb.cluster_stats(counts)
    assert float(st["excb/size_max"]) == 3 * 4 / 4 and float(st["excb/size_min"]) == 0
    assert int(st["excb/empty_clusters"]) == 2 and float(st["excb/purity"]) == 3 / 4


# ----------------------------------------------------------------- plumbing: schedules and the stored head
def test_schedule_offset_takes_the_official_value_at_step_0():
    """OFFICIAL engine/optimizer.py advances its step counter before each step: its lr and weight decay at
    step t are ours at t + 1, so the first lr is lr / warm-up steps, not 0 (--schedule-offset 1, default)."""
    args = excb.Args(lr=0.6, weight_decay=1e-4, wd_end_factor=10.0)
    total, warmup = 1000, 100
    official = excb.schedules(0, total, warmup, args)
    assert official["lr"] == pytest.approx(0.6 / warmup)
    paper = excb.schedules(0, total, warmup, excb.Args(lr=0.6, weight_decay=1e-4, wd_end_factor=10.0,
                                                        schedule_offset=0))
    assert paper["lr"] == 0.0 and paper["decay"] == pytest.approx(1e-4)
    for t in (0, 1, 99, 100, 500, 998):  # the whole official schedule is ours one step ahead; the EMA is not
        ours_next = excb.schedules(t + 1, total, warmup, excb.Args(lr=0.6, weight_decay=1e-4, wd_end_factor=10.0,
                                                                    schedule_offset=0))
        off = excb.schedules(t, total, warmup, args)
        assert all(off[k] == ours_next[k] for k in ("lr", "decay", "centroids"))
        assert off["ema"] == excb.schedules(t, total, warmup, excb.Args(schedule_offset=0))["ema"]
    assert excb.schedules(total - 1, total, warmup, args)["lr"] == pytest.approx(0.6 * 1e-4)  # the floor


@pytest.mark.parametrize("method", ["excb", "resa"])
def test_stored_projector_head_loads_from_a_syncbn_module(method):
    """excb.py and resa.py store the teacher / momentum projector as it is; on multi-GPU its BatchNorms are
    SyncBatchNorm, which make_checkpoint writes as BatchNorm1d (same state keys): the head loads strictly, holds
    no SyncBatchNorm and computes what a plain copy computes."""
    import common
    import resa
    torch.manual_seed(0)
    plain = excb.build_heads(12, 16, 8)[0] if method == "excb" else resa.build_projector(12, 16, 8)
    for mod in plain.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.uniform_(-1, 1), mod.running_var.uniform_(0.5, 2)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) >= 2
    enc, _ = common.build_backbone("convnet", 16)
    ckpt = common.make_checkpoint(method, 1, 10, excb.Args(), common.backbone_spec("convnet", 16), enc, "teacher",
                                  common.dataset_info("digits", 16), {}, heads={"projector": synced})
    head = common.load_heads(ckpt)["projector"]
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in head.modules())
    x = torch.randn(5, 12)
    torch.testing.assert_close(head(x), plain.eval()(x))
