"""simclr_nscl.py method core on one process: the losses against slow per-anchor references, their closed
forms, Theorem 1 on random features, LARS and the LR schedule. Pure torch, a few seconds."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import simclr_nscl as sn  # noqa: E402


def balanced_labels(B, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.arange(B).remainder(C)[torch.randperm(B, generator=g)]


def clustered(B, C, d, labels, spread, seed=0):
    """Two views of B images whose embeddings cluster by class (spread = within-class noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, d, generator=g, dtype=torch.float64)
    base = centres[labels] + spread * torch.randn(B, d, generator=g, dtype=torch.float64)
    return (base + 0.3 * spread * torch.randn(B, d, generator=g, dtype=torch.float64),
            base + 0.3 * spread * torch.randn(B, d, generator=g, dtype=torch.float64))


def slow_reference(z1, z2, labels, tau, kind, decoupled=False):
    """One anchor at a time, straight from the definitions; 2N anchors = view 1 then view 2."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    y = torch.cat([labels, labels])
    n2, N = z.shape[0], z1.shape[0]
    total = 0.0
    for a in range(n2):
        p = (a + N) % n2
        s = lambda k: torch.dot(z[a], z[k]) / tau  # noqa: E731
        if kind == "supcon":
            pos = [k for k in range(n2) if k != a and y[k] == y[a]]
            log_den = torch.logsumexp(torch.stack([s(k) for k in range(n2) if k != a]), 0)
            total = total - sum(s(k) - log_den for k in pos) / len(pos)
            continue
        if kind == "ntxent":
            neg = [k for k in range(n2) if k != a and k != p]
        else:  # nscl
            neg = [k for k in range(n2) if y[k] != y[a]]
        terms = [s(k) for k in neg] + ([] if decoupled else [s(p)])
        total = total - (s(p) - torch.logsumexp(torch.stack(terms), 0))
    return total / n2


@pytest.mark.parametrize("B,C", [(8, 2), (20, 10), (64, 4)])
def test_equal_similarities_closed_forms(B, C):
    z = torch.randn(1, 16).expand(B, 16)  # every cosine is 1
    y = balanced_labels(B, C)
    ntxent, nscl = sn.equal_similarity_losses(B, C)
    for tau in (1.0, 0.5, 0.1):
        assert sn.nt_xent_loss(z, z, tau).item() == pytest.approx(math.log(2 * B - 1), abs=1e-5)
        assert sn.nscl_loss(z, z, y, tau).item() == pytest.approx(math.log(1 + 2 * B * (1 - 1 / C)), abs=1e-5)
    assert (ntxent, nscl) == (math.log(2 * B - 1), math.log1p(2 * B * (1 - 1 / C)))
    # the spec's reference: B 1024, C 10 -> predicted gap 0.1043 at init
    assert math.log(2047) - math.log1p(2048 * 0.9) == pytest.approx(0.1043, abs=1e-4)


@pytest.mark.parametrize("decoupled", [False, True])
def test_nscl_with_distinct_labels_is_ntxent(decoupled):
    z1, z2 = torch.randn(12, 8), torch.randn(12, 8)
    a = sn.nt_xent_loss(z1, z2, 0.5, decoupled)
    b = sn.nscl_loss(z1, z2, torch.arange(12), 0.5, decoupled)
    assert torch.equal(a, b)


@pytest.mark.parametrize("C", [2, 5, 10])
@pytest.mark.parametrize("decoupled", [False, True])
def test_theorem1_gap_on_random_features(C, decoupled):
    bound = sn.theorem1_bound(C)
    for seed in range(4):
        y = balanced_labels(10 * C, C, seed)
        for spread in (0.05, 0.5, 3.0):  # tight clusters (large gap) to nearly random features
            z1, z2 = clustered(10 * C, C, 8, y, spread, seed)
            gap = (sn.nt_xent_loss(z1, z2, 1.0, decoupled) - sn.nscl_loss(z1, z2, y, 1.0, decoupled)).item()
            assert -1e-6 <= gap <= bound, (seed, spread, gap, bound)
    assert sn.theorem1_bound(10) == pytest.approx(0.5994, abs=1e-4)
    assert sn.theorem1_bound(100) == pytest.approx(0.0720, abs=1e-4)


@pytest.mark.parametrize("kind,decoupled", [("ntxent", False), ("ntxent", True), ("nscl", False),
                                            ("nscl", True), ("supcon", False)])
def test_losses_and_gradients_match_slow_reference(kind, decoupled):
    torch.manual_seed(0)
    B, C, tau = 12, 3, 0.5
    y = balanced_labels(B, C)
    z1 = torch.randn(B, 6, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(B, 6, dtype=torch.float64, requires_grad=True)
    fast = {"ntxent": lambda: sn.nt_xent_loss(z1, z2, tau, decoupled),
            "nscl": lambda: sn.nscl_loss(z1, z2, y, tau, decoupled),
            "supcon": lambda: sn.supcon_loss(z1, z2, y, tau)}[kind]()
    g_fast = torch.autograd.grad(fast, (z1, z2))
    ref = slow_reference(z1, z2, y, tau, kind, decoupled)
    g_ref = torch.autograd.grad(ref, (z1, z2))
    assert fast.dtype == torch.float32  # computed in float32 whatever the input dtype
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gradients_finite_in_bf16_and_tiny_tau():
    z1 = torch.randn(16, 8).bfloat16().requires_grad_()
    z2 = torch.randn(16, 8).bfloat16().requires_grad_()
    y = balanced_labels(16, 4)
    for loss in (sn.nt_xent_loss(z1, z2, 0.05), sn.nt_xent_loss(z1, z2, 0.05, True), sn.nscl_loss(z1, z2, y, 0.05),
                 sn.nscl_loss(z1, z2, y, 0.05, True), sn.supcon_loss(z1, z2, y, 0.05)):
        g = torch.autograd.grad(loss, (z1, z2))
        assert torch.isfinite(loss) and all(torch.isfinite(t).all() for t in g)


def test_nscl_raises_when_an_anchor_has_no_negative():
    z = torch.randn(6, 4)
    with pytest.raises(ValueError, match="no negative"):
        sn.nscl_loss(z, z, torch.zeros(6, dtype=torch.long))


def test_lars_proper_vs_official_bug():
    """First step: a weight matrix moves by lr*eta*||w|| (trust ratio); biases / BN take plain SGD without
    decay. With the official bug, the zero-initialised BN shift never moves."""
    for bug in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
        w0, shift0 = net[0].weight.detach().clone(), net[1].bias.detach().clone()
        opt = sn.LARS(sn.lars_param_groups(net, 1e-2, bug), lr=0.5, weight_decay=1e-2, trust_coef=1e-3,
                      freeze_zero_norm=bug)
        net(torch.randn(8, 5)).sin().sum().backward()
        g_shift = net[1].bias.grad.clone()
        opt.step()
        assert (net[0].weight - w0).norm().item() == pytest.approx(0.5e-3 * w0.norm().item(), rel=1e-5)
        if not bug:
            torch.testing.assert_close(net[1].bias, shift0 - 0.5 * g_shift)
        for _ in range(2):
            opt.zero_grad()
            net(torch.randn(8, 5)).pow(2).sum().backward()
            opt.step()
        assert torch.equal(net[1].bias, shift0) == bug  # frozen at 0 only with the official bug


def test_lr_factor_is_warmup_times_cosine():
    E = 100
    assert sn.lr_factor(0, E) == pytest.approx(0.1)
    assert sn.lr_factor(9, E) == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / E)))
    assert sn.lr_factor(50, E) == pytest.approx(0.5)
    assert sn.lr_factor(4.5, E, 10) == pytest.approx(0.55 * 0.5 * (1 + math.cos(math.pi * 4.5 / E)))


def test_presets_parse_and_flags_override():
    for name in sn.PRESETS:
        args = common.parse_args(sn.Args, sn.PRESETS, ["--preset", name])
        assert args.loss in sn.LOSSES and (name == "digits" or args.batch_size % 8 == 0)  # 1, 2, 4, 8 GPUs
    argv = ["--preset", "cifar100", "--crop-scale", "0.2", "1", "--loss", "nscl"]
    args = common.parse_args(sn.Args, sn.PRESETS, argv)
    assert (args.batch_size, args.proj_dim, args.crop_scale, args.loss) == (1024, 128, (0.2, 1.0), "nscl")
