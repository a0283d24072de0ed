"""ReSA method core (resa.py METHOD section) against slow references and its invariants. CPU, ~15 s."""
import copy
import math
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
import common  # noqa: E402
import resa  # noqa: E402


def unit(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=1)


def sinkhorn_reference(S, eps=0.05, iters=3):
    """Slow float64 SwAV-style Sinkhorn on the full (N_rows, N_cols) matrix, element by element, in the
    official orientation (Q = exp(S / eps)^T: rows = momentum samples, columns = online samples)."""
    S = S.double()
    R, C = S.shape
    Q = [[math.exp(S[i, j].item() / eps) for i in range(R)] for j in range(C)]  # C x R
    total = sum(map(sum, Q))
    Q = [[q / total for q in row] for row in Q]
    for _ in range(iters):
        Q = [[q / sum(row) / C for q in row] for row in Q]                 # each momentum sample: 1/C
        col = [sum(Q[j][i] for j in range(C)) for i in range(R)]
        Q = [[Q[j][i] / col[i] / R for i in range(R)] for j in range(C)]  # each online sample: 1/R
    return torch.tensor([[Q[j][i] * R for j in range(C)] for i in range(R)], dtype=torch.float64)


# ----------------------------------------------------------------- Sinkhorn
def test_sinkhorn_marginals_and_reference():
    h, h_bar = unit(12, 16, seed=1), unit(12, 16, seed=2)
    S = h @ h_bar.T
    A = resa.sinkhorn_knopp(S, eps=0.05, iters=3)
    assert A.dtype == torch.float32 and A.shape == (12, 12)
    torch.testing.assert_close(A.sum(1), torch.ones(12), rtol=0, atol=1e-5)  # row-stochastic, exactly
    # 3 iterations: columns move towards uniform (unrelated random features are the hard case) ...
    col_dev = lambda P: (P.sum(0) - 1).abs().max().item()  # noqa: E731
    assert col_dev(A) < col_dev(torch.softmax(S / 0.05, dim=1)) / 2
    assert col_dev(resa.sinkhorn_knopp(S, eps=0.05, iters=50)) < 1e-3  # ... and converge to it
    # with momentum encodings close to the online ones (training), 3 iterations already give ~uniform
    S_train = h @ F.normalize(h + 0.5 * unit(12, 16, seed=3), dim=1).T
    assert col_dev(resa.sinkhorn_knopp(S_train)) < 0.05
    torch.testing.assert_close(A.double(), sinkhorn_reference(S), rtol=1e-4, atol=1e-6)
    # non-square (rows = a subset of the online samples is what each rank holds when distributed)
    S2 = unit(5, 16, seed=3) @ h_bar.T
    torch.testing.assert_close(resa.sinkhorn_knopp(S2).double(), sinkhorn_reference(S2), rtol=1e-4, atol=1e-6)


def test_sinkhorn_half_input_is_float32_and_finite():
    S = unit(64, 32, seed=4) @ unit(64, 32, seed=5).T
    S[torch.arange(64), torch.arange(64)] = 1.0  # the self-similarity maximum: e^20 > float16 max
    assert torch.isinf(torch.exp(S.half() / 0.05)).any()  # what the float32 cast protects against
    expected = resa.sinkhorn_knopp(S.half().float())
    for A in (resa.sinkhorn_knopp(S.half()), resa.sinkhorn_knopp(S.bfloat16())):
        assert A.dtype == torch.float32 and torch.isfinite(A).all()
    torch.testing.assert_close(resa.sinkhorn_knopp(S.half()), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not lower the precision either
        A = resa.self_assignment(unit(64, 32, seed=4), unit(64, 32, seed=5))
    torch.testing.assert_close(A, resa.self_assignment(unit(64, 32, seed=4), unit(64, 32, seed=5)))


# ----------------------------------------------------------------- loss
def loss_reference(z_online, z_momentum, A, tau, two_sided=False):
    """Loops over pairs, rows and columns (single process)."""
    terms = []
    for q, z in enumerate(z_online):
        for v, zb in enumerate(z_momentum):
            if q == v:
                continue
            L = (z @ zb.T / tau).double()
            row = -sum(A[i, j] * (L[i, j] - torch.logsumexp(L[i], 0))
                       for i in range(len(L)) for j in range(len(L))) / len(L)
            if two_sided:
                col = -sum(A[i, j] * (L[i, j] - torch.logsumexp(L[:, j], 0))
                           for i in range(len(L)) for j in range(len(L))) / len(L)
                row = (row + col) / 2
            terms.append(row)
    return sum(terms) / len(terms)


def test_loss_hand_computed():
    # z_0 = z_1 = Zbar_0 = Zbar_1 = identity (2 x 2): logits are 2.5 on the diagonal, 0 off it.
    # Row CE with A = [[.75, .25], [.25, .75]]: .75 * log(1 + e^-2.5) + .25 * (2.5 + log(1 + e^-2.5))
    I = torch.eye(2)
    A = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    expected = math.log1p(math.exp(-2.5)) + 0.25 * 2.5  # = 0.703889...
    assert abs(resa.resa_loss([I, I], [I, I], A, temperature=0.4).item() - expected) < 1e-6
    # A symmetric and logits symmetric: the column CE equals the row CE, so two-sided gives the same
    assert abs(resa.resa_loss([I, I], [I, I], A, 0.4, two_sided=True).item() - expected) < 1e-6


@pytest.mark.parametrize("two_sided", [False, True])
def test_loss_matches_loop_reference(two_sided):
    B, E = 6, 8
    z_online = [unit(B, E, seed=s) for s in (10, 11, 12)]  # 3 views: 2V - 2 = 4 pairs
    z_momentum = [unit(B, E, seed=s) for s in (20, 21)]
    A = resa.sinkhorn_knopp(unit(B, E, seed=30) @ unit(B, E, seed=31).T)
    got = resa.resa_loss(z_online, z_momentum, A, 0.4, two_sided=two_sided)
    torch.testing.assert_close(got.double(), loss_reference(z_online, z_momentum, A, 0.4, two_sided))


def test_loss_skips_same_view_pairs():
    # with q == v skipped, online view v never sees momentum view v: its gradient ignores Zbar_v
    z_online = [unit(4, 8, seed=s).requires_grad_() for s in (1, 2)]
    A = resa.sinkhorn_knopp(unit(4, 8, seed=3) @ unit(4, 8, seed=4).T)
    grads = []
    for seed in (5, 6):  # two different Zbar_0, same Zbar_1
        z_online[0].grad = None
        resa.resa_loss(z_online, [unit(4, 8, seed=seed), unit(4, 8, seed=7)], A).backward()
        grads.append(z_online[0].grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def tiny_nets(predictor=False):
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU())
    online = resa.ReSANet(enc, resa.build_projector(16, 32, 8), resa.build_predictor(8, 32) if predictor else None)
    momentum = resa.ReSANet(copy.deepcopy(online.encoder), copy.deepcopy(online.projector)).requires_grad_(False)
    return online, momentum


def official_step(online, momentum, views, m, opt=None):
    """The order of the official forward: online pass, EMA, momentum pass, assignment, loss."""
    H, Z = online(views)
    resa.ema_update_(list(momentum.parameters()),
                     list(online.encoder.parameters()) + list(online.projector.parameters()), m)
    with torch.no_grad():
        H_bar, Z_bar = momentum(views[:2])
        A = resa.self_assignment(H[0], H_bar[0])
    loss = resa.resa_loss(Z, Z_bar, A)
    loss.backward()
    if opt is not None:
        opt.step()
    return loss, A


def test_gradients_reach_online_only():
    online, momentum = tiny_nets(predictor=True)
    views = [torch.randn(8, 12) for _ in range(3)]
    loss, A = official_step(online, momentum, views, m=0.996)
    assert not A.requires_grad and A.grad_fn is None
    assert all(p.grad is None for p in momentum.parameters())
    for name, p in online.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ema_schedule_is_the_official_half_cosine():
    """resa.py takes m from common.cosine_schedule(step, total, base, 1.0): the official src/utils.py formula
    1 - (1 - base)(cos(pi t / T) + 1) / 2, per step, no warm-up, to the last bits."""
    def official(t, T, base=0.996):
        return 1.0 - (1.0 - base) * (math.cos(math.pi * t / T) + 1.0) / 2.0
    for T in (100, 1000, 12345):
        for t in range(0, T + 1, max(T // 50, 1)):
            assert common.cosine_schedule(t, T, 0.996, 1.0) == pytest.approx(official(t, T), rel=0, abs=1e-15)
    assert common.cosine_schedule(0, 1000, 0.996, 1.0) == pytest.approx(0.996)
    assert common.cosine_schedule(500, 1000, 0.996, 1.0) == pytest.approx(0.998)
    assert common.cosine_schedule(1000, 1000, 0.996, 1.0) == 1.0
    values = [common.cosine_schedule(t, 100, 0.996, 1.0) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))



def test_momentum_changes_only_by_ema():
    online, momentum = tiny_nets()
    opt = torch.optim.SGD(online.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    for m in (0.9, 0.5):  # two steps, so the online net has drifted from the momentum net
        before_m = [p.clone() for p in momentum.parameters()]
        before_o = [p.clone() for p in list(online.encoder.parameters()) + list(online.projector.parameters())]
        opt.zero_grad(set_to_none=True)
        official_step(online, momentum, [torch.randn(8, 12) for _ in range(2)], m, opt)
        for pm, bm, bo in zip(momentum.parameters(), before_m, before_o):
            torch.testing.assert_close(pm, m * bm + (1 - m) * bo)  # EMA of the PRE-step online weights
            assert pm.grad is None and not pm.requires_grad


# ----------------------------------------------------------------- 2 ranks (gloo) == 1 process
def _run_core(h, h_bar, xs, ys, W0, world, rank):
    """Assignment rows, loss and (DDP-averaged) gradient of a linear online net, on this rank's slice."""
    B = h.shape[0] // world
    own = slice(rank * B, (rank + 1) * B)
    A = resa.self_assignment(h[own], h_bar[own])
    out = {"A": common.all_gather_nograd(A)}
    for two_sided in (False, True):
        W = W0.clone().requires_grad_()
        z_online = [F.normalize(x[own] @ W, dim=1) for x in xs]
        z_momentum = [common.all_gather_nograd(F.normalize(y[own] @ W0, dim=1)) for y in ys]
        loss = resa.resa_loss(z_online, z_momentum, A, 0.4, two_sided=two_sided)
        loss.backward()
        out[f"loss{int(two_sided)}"] = common.all_reduce_sum(loss.detach()) / world
        out[f"grad{int(two_sided)}"] = common.all_reduce_sum(W.grad) / world  # what DDP does
    return out


def _worker(rank, world, init_file, inputs, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out = _run_core(*inputs, world=world, rank=rank)
    if rank == 0:
        torch.save(out, result_file)
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_equal_one_process():
    N, D, E = 8, 16, 6
    inputs = (unit(N, D, seed=1), unit(N, D, seed=2), [torch.randn(N, D) for _ in range(3)],
              [torch.randn(N, D) for _ in range(2)], torch.randn(D, E))
    single = _run_core(*inputs, world=1, rank=0)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "out.pt")
        # fork: the children inherit the imported modules instead of importing torch again (CPU only)
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "init"), inputs, result), nprocs=2,
                           start_method="fork")
        double = torch.load(result)
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-5, atol=1e-6, msg=key)
