"""common.py's distributed helpers under 2 gloo processes equal the single-process computation."""
import torch
import torch.nn as nn

import common
from _dist import spawn

W, B, D, E = 2, 6, 5, 4


def _global_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(W * B, D, generator=g)


def _model():
    torch.manual_seed(1)
    return nn.Linear(D, E)


def _contrastive(z_local, z_all, offset):
    """A loss with cross-rank coupling: each LOCAL anchor against ALL gathered candidates."""
    logits = z_local @ z_all.T  # (B, W*B)
    targets = torch.arange(offset, offset + len(z_local))
    return nn.functional.cross_entropy(logits, targets)


def _worker(rank, world):
    x = _global_batch()[rank * B:(rank + 1) * B]
    model = common.ddp_wrap(_model(), common.DistInfo(rank, world, rank, torch.device("cpu"), True))
    z = model(x)
    z_all = common.gather_with_grad(z)
    loss = _contrastive(z, z_all, rank * B)
    loss.backward()
    return {
        "z_all": z_all.detach(),
        "loss_mean": common.all_reduce_mean(loss.detach()),
        "loss_sum": common.all_reduce_sum(loss.detach()),
        "gathered_ids": common.all_gather_nograd(torch.arange(B) + 100 * rank),
        "grad_w": common.unwrap(model).weight.grad.clone(),
        "grad_b": common.unwrap(model).bias.grad.clone(),
    }


def test_gather_and_gradients_equal_single_process():
    results = spawn(_worker, W)
    model = _model()
    x = _global_batch()
    z = model(x)
    loss = _contrastive(z, z, 0)  # mean over all W*B anchors against all candidates
    loss.backward()
    for r in results:
        torch.testing.assert_close(r["z_all"], z.detach())
        torch.testing.assert_close(r["loss_mean"], loss.detach())
        torch.testing.assert_close(r["loss_sum"], W * loss.detach())
        assert r["gathered_ids"].tolist() == list(range(B)) + [100 + i for i in range(B)]
        # the gradient scale, not only its direction: DDP's average of per-rank gradients through
        # gather_with_grad equals the global-batch gradient
        torch.testing.assert_close(r["grad_w"], model.weight.grad)
        torch.testing.assert_close(r["grad_b"], model.bias.grad)


def test_helpers_are_identity_on_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert common.gather_with_grad(x) is x
    assert common.all_gather_nograd(x) is x
    assert common.all_reduce_mean(x) is x
    m = nn.Linear(2, 2)
    assert common.ddp_wrap(m, common.DistInfo()) is m
