"""simclr_nscl.py under 2 gloo ranks: every loss (value AND gradient, after DDP's averaging) equals the
single-process computation on the same global batch; and the class-balanced sampler NSCL relies on."""
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import simclr_nscl as sn  # noqa: E402

W, B, C, D_IN = 2, 6, 3, 7  # ranks, images per rank, classes, input size
KINDS = {
    "ntxent": lambda z1, z2, y: sn.nt_xent_loss(z1, z2, 0.5),
    "dcl": lambda z1, z2, y: sn.nt_xent_loss(z1, z2, 0.5, decoupled=True),
    "nscl": lambda z1, z2, y: sn.nscl_loss(z1, z2, y, 0.5),
    "nscl_decoupled": lambda z1, z2, y: sn.nscl_loss(z1, z2, y, 0.5, decoupled=True),
    "supcon": lambda z1, z2, y: sn.supcon_loss(z1, z2, y, 0.5),
}


def global_batch():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(W * B, D_IN, generator=g), torch.randn(W * B, D_IN, generator=g)
    y = torch.arange(W * B).remainder(C)[torch.randperm(W * B, generator=g)]
    return x1, x2, y


def make_net():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))


def _worker(rank, init_file, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    x1, x2, y = global_batch()
    local = slice(rank * B, (rank + 1) * B)
    results = {}
    for kind, loss_fn in KINDS.items():
        net = torch.nn.parallel.DistributedDataParallel(make_net())
        z = net(torch.cat([x1[local], x2[local]]))  # one forward for both views, as in training
        loss = loss_fn(*z.chunk(2), y[local])
        loss.backward()  # DDP averages the parameter gradients over the ranks
        results[kind] = (common.all_reduce_mean(loss.detach()), [p.grad.clone() for p in net.parameters()])
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    tdist.destroy_process_group()


def test_two_ranks_match_single_process_loss_and_gradients():
    x1, x2, y = global_batch()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(str(Path(tmp) / "init"), tmp), nprocs=W, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(W)]
    for kind, loss_fn in KINDS.items():
        net = make_net()
        z = net(torch.cat([x1, x2]))
        loss = loss_fn(*z.chunk(2), y)
        loss.backward()
        for r in range(W):
            loss_r, grads_r = ranks[r][kind]
            torch.testing.assert_close(loss_r, loss.detach(), rtol=1e-5, atol=1e-6, msg=f"{kind} rank {r}")
            for p, g in zip(net.parameters(), grads_r):
                torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6, msg=f"{kind} grad rank {r}")


def test_class_balanced_sampler_is_balanced_complete_and_disjoint():
    """NSCL needs every global batch to hold batch/C images of each class (sn.ClassBalancedBatchSampler)."""
    classes, per_class, batch = 5, 40, 20
    targets = torch.arange(classes).repeat_interleave(per_class)[torch.randperm(classes * per_class)]
    samplers = [sn.ClassBalancedBatchSampler(targets, batch, common.DistInfo(rank=r, world_size=W), seed=3)
                for r in range(W)]
    orders = []
    for epoch in (0, 1):
        seen = []
        for s in samplers:
            s.set_epoch(epoch)
        for slices in zip(*samplers):
            assert all(len(s) == batch // W for s in slices)
            assert not set(slices[0]) & set(slices[1])  # disjoint across ranks
            for s in slices:  # each rank's slice is balanced too (batch / W = 10 = 2 per class)
                assert torch.bincount(targets[s], minlength=classes).tolist() == [batch // W // classes] * classes
            seen += slices[0] + slices[1]
        assert sorted(seen) == list(range(classes * per_class))  # every index exactly once per epoch
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled each epoch


def test_class_balanced_sampler_one_image_per_class_per_rank():
    """(moved from test_common_distributed.py with the sampler) 10 classes x 12 images, global batch 20 over
    2 ranks: each global batch holds 2 images per class, each rank's slice 1 per class."""
    targets = torch.arange(10).repeat_interleave(12)
    per_rank = []
    for rank in range(W):
        sampler = sn.ClassBalancedBatchSampler(targets.tolist(), 20, common.DistInfo(rank, W), seed=3)
        sampler.set_epoch(1)
        per_rank.append([list(b) for b in sampler])
    assert len(per_rank[0]) == len(per_rank[1]) == 120 // 20
    seen = []
    for b0, b1 in zip(*per_rank):
        assert not set(b0) & set(b1)  # disjoint across ranks
        assert torch.bincount(targets[b0 + b1], minlength=10).tolist() == [2] * 10
        assert torch.bincount(targets[b0], minlength=10).tolist() == [1] * 10  # each rank balanced too
        seen += b0 + b1
    assert sorted(seen) == list(range(120))  # every index exactly once per epoch


def test_class_balanced_sampler_needs_a_batch_that_divides_over_the_ranks():
    with pytest.raises(ValueError, match="not divisible by 2 ranks"):
        sn.ClassBalancedBatchSampler(torch.zeros(10), 5, common.DistInfo(0, 2))
