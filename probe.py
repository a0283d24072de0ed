"""probe.py: evaluate checkpoints of excb.py, resa.py and simclr_nscl.py with labels.

PROBES (top-level functions on feature tensors; accuracies are in percent)
    common.knn_accuracy  DINO weighted k-NN (cosine, k=20, T=0.07): the ImageNet k-NN of ExCB and ReSA;
                     metric="euclidean", k=5: ReSA's CIFAR majority vote (shared with monitor.py).
    linear_probe     ReSA's CIFAR protocol on precomputed features (Adam 1e-2 -> 1e-6 exponential over
                     500 epochs, wd 5e-6, batch 1000, no augmentation), top-1 / top-5.
    few_shot         NSCL's few-shot probes: nearest class centre (NCCC) and a bias-free linear probe
                     (Adam 3e-4, 100 epochs) on N labelled images per class, repeats batched.
    cdnv, directional_cdnv, few_shot_bound
                     NSCL's class-distance normalised variance, its directional form and the few-shot
                     error bound of Proposition 1, printed beside the measured NCCC error.
MODES (through the frozen or trainable backbone, with augmentation)
    --mode linear-aug   ImageNet linear protocol: crop+flip through the frozen backbone, SGD, 100 epochs
                        (ExCB: lr 0.3 cosine, batch 256; ReSA: lr 10 x B/256, steps at 60/80).
    --mode finetune     semi-supervised fine-tuning (backbone + linear head) on 1% / 10% of the labels,
                        class-stratified, or a SimCLR split file (ExCB / ReSA Tab. "semi-supervised").
    --dataset NAME      transfer: probe on another dataset than the one pretrained on (ReSA transfer).

Commands (from the repository root):
    python probe.py runs/excb_digits                      # every checkpoint of a run, default probes
    python probe.py runs/excb_digits/ckpt_epoch0010.pt --probes knn,linear,fewshot,cdnv
    python probe.py RUN --features projector              # NSCL few-shot numbers use the projector z
    python probe.py RUN --dataset cifar100 --data-dir data   # transfer
    python probe.py CKPT --mode linear-aug --epochs 100
    python probe.py CKPT --mode finetune --label-fraction 0.01   # or --split-file 1percent.txt
Backbone features are extracted once per checkpoint and split and cached in OUT_DIR/features/; results go
to OUT_DIR/probe.csv and probe.json (one row per checkpoint x probe x metric) and PNGs; OUT_DIR is --out-dir,
default the run directory. Manual, timings: docs/probe.md.
"""
import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# =====================================================================================================
# PROBES on feature tensors. Shapes: train_x (N, D), train_y (N,) long, test_x (M, D), C classes,
# R repeats, n shots per class. Labels are class ids in [0, C); C = max label + 1 unless given.
# =====================================================================================================


def linear_probe(train_x, train_y, test_x, test_y, num_classes=None, epochs=500, lr=1e-2, final_lr=1e-6,
                 weight_decay=5e-6, batch_size=1000, seed=0, device=None):
    """ReSA's CIFAR linear probe on fixed features (resa_cifar eval/evaluate.py, W-MSE/INTL protocol).

    nn.Linear(D, C) with PyTorch's default init, cross-entropy, Adam(lr, weight_decay as L2 in the
    gradient, as torch.optim.Adam does), ExponentialLR with gamma = (final_lr / lr)^(1/epochs) stepped per
    epoch, minibatches of batch_size from a fresh permutation each epoch (last one partial), no feature
    normalisation, no augmentation. The features stay one tensor on `device` (default: train_x's), so a
    step is an index, two small matmuls and an Adam update. Returns {"top1": %, "top5": %}.
    """
    device = torch.device(device) if device is not None else train_x.device
    C = num_classes or int(max(train_y.max(), test_y.max())) + 1
    X, Y, g = train_x.to(device, torch.float32), train_y.to(device), torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG stream
        torch.random.default_generator.manual_seed(seed)
        head = nn.Linear(X.shape[1], C).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, (final_lr / lr) ** (1.0 / max(epochs, 1)))  # gamma
    n, progress = len(X), common.Progress("linear probe", epochs, "epochs")
    with common.cpu_threads(int(device.type == "cpu")):  # 1 thread on CPU (common.cpu_threads), else as is
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g).to(device)
            for s in range(0, n, batch_size):
                idx = perm[s:s + batch_size]
                loss = F.cross_entropy(head(X.index_select(0, idx)), Y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            progress.update()
    return _eval_head(head, test_x, test_y, device)


@torch.no_grad()
def _eval_head(head, x, y, device, batch=8192):
    """{"top1", "top5"} accuracy in percent of head(x) (features -> logits; nn.Identity for logits).
    With fewer than 5 classes, top-5 is top-C (= 100)."""
    top1 = top5 = 0
    for s in range(0, len(x), batch):
        logits = head(x[s:s + batch].to(device, torch.float32)).float()  # (b, C)
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[s:s + batch].to(device)[:, None]
        top1, top5 = top1 + int(hit[:, 0].sum()), top5 + int(hit.any(1).sum())  # label first / among the 5
    return {"top1": 100.0 * top1 / len(x), "top5": 100.0 * top5 / len(x)}


# ----- few-shot: NSCL Sec. 5 / Appendix C protocols --------------------------------------------------


def sample_shots(y, n, repeats, generator=None):
    """(R, C', n) indices: n distinct random images of every class present in y, independently per repeat.

    C' is the number of classes present (sorted ascending); classes with fewer than n images raise.
    """
    classes, counts = y.unique(return_counts=True)
    if int(counts.min()) < n:
        raise ValueError(f"{n} shots requested but a class has only {int(counts.min())} images")
    # per class: the first n of a random order of its members, (R, n), drawn independently per repeat
    return torch.stack([m[torch.rand(repeats, len(m), generator=generator).argsort(1)[:, :n]]
                        for m in ((y == c).nonzero().squeeze(1).cpu() for c in classes.tolist())], 1)


def nccc_scores(centres, x):
    """Nearest class-centre scores, (R, C, D) centres and (M, D) x -> (R, M, C); larger = closer.

    -||x - mu||^2 up to the row constant ||x||^2: 2 x.mu - ||mu||^2, so argmax = Euclidean argmin.
    One batched matmul (the (R, M, C) result is the only large tensor).
    """
    mu_sq = (centres * centres).sum(-1)  # (R, C)
    return 2 * torch.einsum("md,rcd->rmc", x.to(centres), centres) - mu_sq[:, None, :]


def _nccc_eval(scores, y, C):
    """C-way accuracy (R,) and the mean 2-way error over class pairs (R,) from (R, M, C) NCCC scores.

    2-way: for classes (i, j), an image of class i is wrong when centre j is closer than centre i; the
    pair's error is (wrong_i + wrong_j) / (n_i + n_j), averaged over the C(C-1)/2 pairs. This is the
    expected NCCC error of a uniformly drawn 2-way task, the quantity NSCL's 2-way bound is about.
    """
    acc = (scores.argmax(-1) == y[None]).float().mean(1) * 100  # (R,)
    own = scores.gather(2, y[None, :, None].expand(len(scores), -1, 1))  # (R, M, 1)
    wrong = (scores > own).to(scores.dtype)  # (R, M, C): centre j beats the own-class centre
    W = scores.new_zeros(len(scores), C, C).index_add_(1, y, wrong)  # W[r, i, j]: class i closer to centre j
    n = torch.bincount(y, minlength=C).to(scores.dtype)
    iu = torch.triu_indices(C, C, 1, device=scores.device)
    pair_err = (W[:, iu[0], iu[1]] + W[:, iu[1], iu[0]]) / (n[iu[0]] + n[iu[1]])  # (R, pairs)
    return acc, pair_err.mean(1) * 100


def _few_shot_linear(xs, ys, test_sets, C, epochs, lr, batch_size, generator):
    """R bias-free linear probes trained at once: xs (R, n, D), ys (R, n) -> top-1 % per set, each (R,).

    One weight tensor W (R, C, D), initialised as nn.Linear's, and one Adam: the loss is the sum over repeats
    of each repeat's batch mean, so every repeat receives exactly its own gradient and Adam's per-element
    state keeps them apart.
    """
    R, n, D = xs.shape
    W = ((torch.rand(R, C, D, generator=generator) * 2 - 1) / math.sqrt(D)).to(xs).requires_grad_()
    opt = torch.optim.Adam([W], lr=lr)
    bs = min(batch_size, n)
    with common.cpu_threads(int(xs.device.type == "cpu")):
        for _ in range(epochs):
            # (R, n): every repeat shuffles its own N-shot set
            perm = torch.rand(R, n, generator=generator).argsort(1).to(xs.device)
            for s in range(0, n, bs):
                b = perm[:, s:s + bs]
                xb = xs.gather(1, b[..., None].expand(-1, -1, D))  # (R, B, D)
                logits = torch.bmm(xb, W.transpose(1, 2))  # (R, B, C)
                loss = F.cross_entropy(logits.flatten(0, 1), ys.gather(1, b).flatten()) * R
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    W = W.detach()  # logits (R, M, C) = x W^T per repeat, as NCCC's scores
    return [(torch.einsum("md,rcd->rmc", x.to(W), W).argmax(-1) == y[None].to(W.device)).float().mean(1) * 100
            for x, y in test_sets]


def few_shot(train_x, train_y, test_x, test_y, shots=(1, 5, 10, 20, 50, 100, 200, 500), repeats=5,
             probes=("nccc", "linear"), epochs=100, lr=3e-4, batch_size=256, eval_train=True, seed=0,
             device=None):
    """NSCL's few-shot probes on N labelled train images per class, R repeats with fresh samples.

    nccc: class centres = mean of the N shots; predict the nearest centre in Euclidean distance
          (NSCL scripts/nccc_eval.py), C-way accuracy and the mean 2-way error over class pairs.
    linear: nn.Linear(D, C, bias=False), cross-entropy, Adam lr 3e-4 without weight decay, 100 epochs,
          batch min(N*C, 256), shuffled (NSCL scripts/linear_probe.py).
    Accuracy on the full test set (and the full train set when eval_train, as NSCL reports both).
    Shots larger than the smallest class are skipped. Returns a list of dicts
    {"shots", "probe" ("nccc" | "nccc_2way_err" | "linear"), "split", "mean", "std", "values"}.
    DEVIATION: NSCL's linear probe reseeds random.seed(123) on every call, so its 5 repeats share one
    subset and differ only in initialisation; here every repeat draws a fresh subset (as its NCCC does).
    """
    device = torch.device(device) if device is not None else train_x.device
    classes, ytr = train_y.cpu().unique(return_inverse=True)  # labels -> positions 0..C-1 of train's classes
    C, yte = len(classes), torch.searchsorted(classes, test_y.cpu()).clamp(max=len(classes) - 1)
    if (classes[yte] != test_y.cpu()).any():
        raise ValueError("test labels contain classes absent from the train features")
    Xtr, Xte, ytr, yte = (v.to(device) for v in (train_x.float(), test_x.float(), ytr, yte))
    sets = [("test", Xte, yte)] + ([("train", Xtr, ytr)] if eval_train else [])
    shots = [n for n in shots if n <= int(torch.bincount(ytr).min())]  # N above the smallest class: skipped
    raw, progress = [], common.Progress("few-shot", len(shots), "shot counts")  # raw: (N, probe, split, (R,))
    g = torch.Generator().manual_seed(seed)
    for n in shots:
        idx = sample_shots(ytr.cpu(), n, repeats, g).to(device)  # (R, C, n)
        xs = Xtr[idx]  # (R, C, n, D)
        if "nccc" in probes:
            centres = xs.mean(2)  # (R, C, D)
            for split, x, y in sets:
                acc, err2 = _nccc_eval(nccc_scores(centres, x), y, C)
                raw += [(n, "nccc", split, acc), (n, "nccc_2way_err", split, err2)]
        if "linear" in probes:
            ys = torch.arange(C, device=device).repeat_interleave(n).expand(repeats, -1)  # (R, C*n)
            accs = _few_shot_linear(xs.flatten(1, 2), ys.contiguous(), [(x, y) for _, x, y in sets], C,
                                    epochs, lr, batch_size, g)
            raw += [(n, "linear", split, acc) for (split, _, _), acc in zip(sets, accs)]
        progress.update()
    return [{"shots": n, "probe": p, "split": split, "mean": v.double().mean().item(),
             "std": v.double().std(unbiased=False).item(), "values": v.double().tolist()}
            for n, p, split, v in raw]


# ----- CDNV, directional CDNV and the few-shot bound (NSCL Sec. 4, Proposition 1) -------------------


def _class_geometry(x, y, chunk=65536):
    """Class means mu (C, D), population variances var (C,) = E||x - mu_c||^2, counts (C,), positions y.

    float64 and centred sums (not E||x||^2 - ||mu||^2, which cancels badly far from the origin), in row
    chunks so a large feature matrix is never copied whole in float64.
    """
    _, yi, counts = y.unique(return_inverse=True, return_counts=True)
    C, D, counts = len(counts), x.shape[1], counts.double()
    mu = torch.zeros(C, D, dtype=torch.float64, device=x.device)
    for s in range(0, len(x), chunk):
        mu.index_add_(0, yi[s:s + chunk], x[s:s + chunk].double())
    mu /= counts[:, None]
    var = torch.zeros(C, dtype=torch.float64, device=x.device)
    for s in range(0, len(x), chunk):
        xc = x[s:s + chunk].double() - mu[yi[s:s + chunk]]
        var.index_add_(0, yi[s:s + chunk], (xc * xc).sum(1))
    return mu, var / counts, counts, yi


def cdnv(x, y):
    """Class-distance normalised variance (Galanti et al. 2022; NSCL Sec. 4), a float.

    CDNV = mean over unordered class pairs i < j of (Var_i + Var_j) / (2 ||mu_i - mu_j||^2), Var = trace
    of the population (1/n) covariance. Pairs with coincident means are skipped and the mean is over the
    pairs counted (NSCL v2 convention; v1 divides by C(C-1)/2 regardless).
    """
    mu, var, _, _ = _class_geometry(x, y)
    d2 = torch.cdist(mu, mu) ** 2  # (C, C)
    i, j = torch.triu_indices(len(mu), len(mu), 1, device=mu.device)
    return ((var[i] + var[j]) / (2 * d2[i, j]))[d2[i, j] > 0].mean().item()  # pairs with distinct means


def directional_cdnv(x, y, chunk=65536):
    """Directional CDNV (NSCL Sec. 4), a float: mean over ORDERED pairs i != j (no factor 1/2) of

        E_{x in i}[ ((x - mu_i) . u_ij)^2 ] / ||mu_j - mu_i||^2,   u_ij = (mu_j - mu_i) / ||mu_j - mu_i||,

    the variance of class i along the line to class j. With G = (x - mu_i) mu^T, the projection on
    mu_j - mu_i is G[:, j] - G[:, i], so all pairs cost one (N, C) matmul.
    """
    mu, _, counts, yi = _class_geometry(x, y, chunk)
    C = len(mu)
    # S[i, j] = sum over x in class i of ((x - mu_i) . (mu_j - mu_i))^2
    S = torch.zeros(C, C, dtype=torch.float64, device=x.device)
    for s in range(0, len(x), chunk):
        ys = yi[s:s + chunk]
        G = (x[s:s + chunk].double() - mu[ys]) @ mu.T  # (n, C)
        proj = G - G.gather(1, ys[:, None])  # (n, C)
        S.index_add_(0, ys, proj * proj)
    d2 = torch.cdist(mu, mu) ** 2
    keep = (d2 > 0) & ~torch.eye(C, dtype=torch.bool, device=x.device)
    return (S / counts[:, None] / d2 ** 2)[keep].mean().item()


def few_shot_bound(dir_cdnv, cdnv, m, n_classes=2, return_a=False):
    """NSCL Proposition 1: the nearest-class-centre error with m shots per class, C' = n_classes, is at most

        (C' - 1) * min_{a >= 5} [ Vt (1/2 - A/a)^-2 + B_m a ],   A = 2 + 2^{3/2}/m,
        B_m = (1/4) ( (2/sqrt(m)) (V^s + V) + V/m ),   Vt = dir_cdnv, V = cdnv,

    with V^s = sqrt(V) as in the authors' bound_analysis/old_bound_core.py (OFFICIAL; the paper's V^s is
    not reproduced here). E(a) is convex for a > 2A, so the minimum is at a* = max(5, 2A + y*) where y* is
    the positive root of y^3 - 8F y - 16 F A = 0 (E'(a) = 0 with y = a - 2A, F = 2 Vt A / B_m): its largest
    real root (numpy.roots), as the cubic has exactly one positive root and its roots sum to 0.
    Reference (Vt=0.0728605, V=1.6721367, C'=2): m=1 -> 29.114, m=5 -> 8.196, m=500 -> 1.459.
    An error bound, so values above 1 are vacuous; returned unclipped to match the paper's numbers.
    """
    Vt, V, m = float(dir_cdnv), float(cdnv), float(m)
    A = 2 + 2 ** 1.5 / m
    B = 0.25 * ((2 / math.sqrt(m)) * (math.sqrt(V) + V) + V / m)
    if Vt <= 0:
        a = max(5.0, 2 * A)  # no directional term: E(a) = B_m a, smallest admissible a
    elif B <= 0:
        a = float("inf")
    else:
        Fv = 2 * Vt * A / B
        a = max(5.0, 2 * A + float(np.roots([1, 0, -8 * Fv, -16 * Fv * A]).real.max()))
    value = (n_classes - 1) * (Vt * (0.5 - A / a) ** -2 + B * a) if math.isfinite(a) else (
        (n_classes - 1) * 4 * Vt)
    return (value, a) if return_a else value


# =====================================================================================================
# MODES through the backbone: the ImageNet linear protocol with augmentation, semi-supervised fine-tuning
# =====================================================================================================


def _init_head(D, C, device):
    """Linear head initialised N(0, 0.01) with zero bias (ExCB engine/linear_eval, ReSA eval_linear.py)."""
    head = nn.Linear(D, C).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def linear_aug(backbone, train_set, test_x, test_y, num_classes, epochs=100, lr=0.3, batch_size=256,
               schedule="cosine", device="cpu", workers=0, seed=0, log=print, precision="fp32"):
    """ImageNet linear protocol: a linear head on the FROZEN backbone (eval mode, so BN statistics are
    fixed), trained on random-resized-crop + flip views, SGD momentum 0.9, no weight decay (ExCB's
    effective wd; ReSA sets 0). train_set yields augmented (image, label); test_x are the cached
    centre-crop features, which the frozen backbone would reproduce exactly. Returns {"top1", "top5"} %.
    """
    device, backbone = torch.device(device), backbone.to(device).eval().requires_grad_(False)  # frozen
    head = _init_head(test_x.shape[1], num_classes, device)
    _sgd_epochs("linear-aug", nn.Sequential(backbone, head), [{"params": head.parameters(), "base": lr}],
                train_set, batch_size, False, schedule, epochs, workers, seed, log, device, precision)
    return _eval_head(head, test_x, test_y, device)


def _sgd_epochs(tag, model, groups, train_set, batch_size, drop_last, schedule, epochs, workers, seed, log,
                device, precision):
    """linear-aug's and finetune's loop: cross-entropy of model(x) (autocast: bf16 needs no GradScaler), SGD
    with momentum 0.9 and no weight decay on the parameter groups, each group's lr from its "base" per step,
    a progress line with an ETA and a line per epoch. schedule: cosine: half cosine from base to 0 per step
    (ExCB); step: x0.1 at 60% and 80% of training (ReSA's MultiStep [60, 80] of 100 epochs)."""
    opt = torch.optim.SGD(groups, lr=groups[-1]["base"], momentum=0.9, weight_decay=0.0)
    loader = common.build_loader(train_set, batch_size, common.DistInfo(device=device), workers,
                                 shuffle=True, drop_last=drop_last, seed=seed)
    total = epochs * len(loader)
    progress = common.Progress(tag, total, "steps")  # progress.done: the steps taken, the schedule's clock
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        t0, loss_sum = time.perf_counter(), 0.0
        for x, y in loader:
            t = progress.done
            for group in opt.param_groups:
                group["lr"] = (common.cosine_schedule(t, total, group["base"]) if schedule == "cosine" else
                               group["base"] * 0.1 ** ((t >= 0.6 * total) + (t >= 0.8 * total)))
            with common.autocast(device, precision):
                logits = model(x.to(device, non_blocking=True))
            loss = F.cross_entropy(logits.float(), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            progress.update()
        log(f"{tag} epoch {epoch + 1}/{epochs} loss {float(loss_sum) / len(loader):.4f} "
            f"({time.perf_counter() - t0:.1f} s)")


def label_subset(targets, fraction=0.0, split_file=None, names=None, seed=0):
    """Indices of the labelled images for semi-supervised fine-tuning.

    split_file: SimCLR's 1percent.txt / 10percent.txt (one image file name per line, e.g.
    n01440764_10026.JPEG, matched against `names`, the dataset's file names) or one integer index per line.
    Otherwise a class-stratified random subset: round(fraction * n_c) images of every class c, at least 1.
    """
    if split_file:  # a bad line is a common.UsageError (a ValueError): one line on the command line
        lines = [ln.strip() for ln in Path(split_file).read_text().splitlines() if ln.strip()]
        digits = all(ln.isdigit() for ln in lines)  # indices, else file names matched by their base name
        keys = [int(ln) if digits else Path(ln).name for ln in lines]
        where = dict(zip(range(len(targets)), range(len(targets)))) if digits else {
            Path(n).name: i for i, n in enumerate(names or [])}
        missing = [ln for ln, k in zip(lines, keys) if k not in where]
        if missing:
            why = "" if digits or names else ", without file names: give indices"
            raise common.UsageError(f"{split_file}: {len(missing)} of {len(lines)} lines not in the dataset "
                                    f"({len(targets)} images{why}), e.g. {missing[:3]}")
        return torch.tensor([where[k] for k in keys])
    g = torch.Generator().manual_seed(seed)
    members = [(targets == c).nonzero().squeeze(1) for c in targets.unique().tolist()]
    return torch.cat([m[torch.randperm(len(m), generator=g)[:max(1, round(fraction * len(m)))]]
                      for m in members]).sort().values


def finetune(backbone, train_set, test_loader, num_classes, epochs=50, lr_backbone=8e-5, lr_head=1.0,
             batch_size=512, device="cpu", workers=0, seed=0, log=print, precision="fp32"):
    """Semi-supervised fine-tuning: backbone (train mode) + a new linear head on the labelled subset,
    crop+flip views, SGD momentum 0.9 without weight decay, cosine to 0 per step, separate learning
    rates for the backbone and the head (ExCB Sec. 4: 50 epochs, batch 512, backbone 8e-5 / 3e-4 and
    head 1.0 / 0.2 for 1% / 10% of ImageNet; ReSA: 20 epochs, cosine, backbone 2e-4). Evaluated on
    the un-augmented test loader through the fine-tuned backbone. Returns {"top1", "top5"} %.
    """
    device, backbone = torch.device(device), backbone.to(device)
    D = int(getattr(backbone, "feature_dim", 0)) or backbone(next(iter(test_loader))[0][:2].to(device)).shape[1]
    head = _init_head(D, num_classes, device)
    groups = [{"params": list(backbone.parameters()), "base": lr_backbone},
              {"params": list(head.parameters()), "base": lr_head}]
    # Tiny labelled subsets (1% of a small set) can be smaller than a batch: keep the partial batch.
    batch_size = min(batch_size, len(train_set))
    _sgd_epochs("finetune", nn.Sequential(backbone.train(), head), groups, train_set, batch_size,
                len(train_set) > batch_size, "cosine", epochs, workers, seed, log, device, precision)
    logits = common.extract_features(nn.Sequential(backbone, head), test_loader, device, precision)
    return _eval_head(nn.Identity(), *logits, "cpu")


# =====================================================================================================
# CLI: checkpoints -> cached features -> probes -> probe.csv / probe.json, a table and plots (plumbing)
# =====================================================================================================

PROBES = ("knn", "linear", "fewshot", "cdnv")
# columns; unit: "%" (accuracies, errors, bounds) or "ratio" (CDNVs), so pandas reads value as numbers
FIELDS = "checkpoint epoch method features dataset precision probe metric shots value std unit".split()
KEY = ("checkpoint", "features", "dataset", "precision", "probe", "metric", "shots")  # a row's identity


def _probe_list(text):
    """The type of --probes: a comma list of PROBES, normalised to "a,b". A bad item is an ArgumentTypeError,
    which common.parse_args turns into one `error: argument --probes: ...` line (exit 2) before any work."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names or set(names) - set(PROBES):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of {','.join(PROBES)}")
    return ",".join(names)


def _f(default, help, **check):
    """A flag: its default, its help, and its checks (choices=(...), range="[1, inf)"; common.parse_args)."""
    return field(default=default, metadata={"help": help, **check})


_GE0, _GE1, _POS = "[0, inf)", "[1, inf)", "(0, inf)"  # range= of counts (0: all / the default), reals


@dataclass
class Args:
    # --- what to probe, and where ---
    path: str = _f("", "checkpoint file or run directory (its *.pt in epoch order); may come first")
    mode: str = _f("probe", "probe: the feature probes of --probes; linear-aug: ImageNet linear protocol "
                   "(frozen backbone); finetune: semi-supervised; bench: time the probes on synthetic "
                   "features", choices=("probe", "linear-aug", "finetune", "bench"))
    probes: _probe_list = _f(",".join(PROBES), "comma list of " + ",".join(PROBES))
    features: str = _f("backbone", "backbone: the evaluation encoder's h (ReSA, ExCB); projector: the stored "
                       "projector's z (NSCL's few-shot numbers)", choices=("backbone", "projector"))
    dataset: str = _f("", "probe on this dataset, not the pretraining one (transfer: e.g. cifar100 for "
                      "CIFAR-10)", choices=("",) + common.DATASETS)
    data_dir: str = _f("", "dataset root (default: the checkpoint's)")
    download: bool = _f(False, "download a missing transfer dataset")
    max_train: int = _f(0, "class-stratified subset of the train split (0 = all)", range=_GE0)
    max_test: int = _f(0, "class-stratified subset of the test split (0 = all)", range=_GE0)
    out_dir: str = _f("", "where probe.csv/json, the PNGs and the feature cache go (default: the run dir)")
    skip_damaged: bool = _f(False, "skip unreadable (damaged, empty) checkpoints with a warning, not stop")
    device: str = _f("auto", "auto: cuda when available", choices=("auto", "cpu", "cuda"))
    # --- k-NN ---
    knn_k: int = _f(20, "neighbours of the weighted cosine k-NN (DINO, ExCB: 20)", range=_GE1)
    knn_temperature: float = _f(0.07, "T in the vote weight exp(sim / T) (DINO, ReSA ImageNet)", range=_POS)
    knn_euclid_k: int = _f(5, "neighbours of the Euclidean majority vote (ReSA CIFAR)", range=_GE1)
    # --- classifiers of linear, linear-aug and finetune (0 = the protocol default of the mode) ---
    epochs: int = _f(0, "0: probe 500 (ReSA CIFAR), linear-aug 100, finetune 50 (ExCB; ReSA 20)", range=_GE0)
    lr: float = _f(0.0, "0: probe 1e-2 (Adam, decayed to 1e-6), linear-aug 0.3 (SGD, ExCB; ReSA: 10 x B/256 "
                   "with --lr-schedule step), finetune 1.0 at <= 5%% labels, else 0.2 (ExCB)", range=_GE0)
    batch_size: int = _f(0, "0: probe 1000, linear-aug 256, finetune 512", range=_GE0)
    lr_schedule: str = _f("cosine", "linear-aug: cosine (ExCB); step: x0.1 at 60%% and 80%% (ReSA)",
                          choices=("cosine", "step"))
    min_crop_scale: float = _f(0.08, "lower scale of linear-aug's and finetune's crops", range="(0, 1]")
    label_fraction: float = _f(0.01, "finetune: labelled fraction of every class", range="(0, 1]")
    split_file: str = _f("", "finetune: SimCLR split file (image file names or indices, one per line)")
    lr_backbone: float = _f(0.0, "finetune's backbone lr; 0: 8e-5 at <= 5%% labels, else 3e-4", range=_GE0)
    # --- few-shot (NSCL) ---
    shots: tuple[int, ...] = _f((1, 5, 10, 20, 50, 100, 200, 500), "images per class, N (default: those the "
                                "smallest train class allows)", range=_GE1)
    repeats: int = _f(5, "fresh N-shot samples per N (NSCL: 5)", range=_GE1)
    fewshot_epochs: int = _f(100, "epochs of the few-shot linear probe (NSCL CIFAR: 100)", range=_GE1)
    fewshot_lr: float = _f(3e-4, "Adam lr of the few-shot linear probe (NSCL)", range=_POS)
    # --- system ---
    eval_batch_size: int = _f(256, "batch of the feature extraction", range=_GE1)
    precision: str = _f("fp32", "of the feature extraction and linear-aug / finetune passes (in the cache "
                        "name, probe.csv); fp32: exact; bf16: faster on GPUs, rounds the features",
                        choices=("fp32", "bf16"))
    workers: int = _f(0, "data-loading workers", range=_GE0)
    seed: int = _f(0, "seed of every probe's sampling and initialisation")
    cache: bool = _f(True, "reuse OUT_DIR/features/*.pt when not older than the checkpoint")
    plots: bool = _f(True, "write the PNGs")


def _features(args, path, ckpt, split, device, cache_dir):
    """(x, y) of one split for --features. Backbone features are extracted once and cached as {"x", "y"} in
    cache_dir; the projector (eval mode, L2-normalised when the checkpoint says normalize_output) is a small
    MLP applied to them on the fly."""
    t, dataset = time.perf_counter(), args.dataset or ckpt["data"]["dataset"]
    limit = args.max_train if split == "train" else args.max_test
    cache = Path(cache_dir) / (f"{path.stem}_{dataset}_{split}_backbone_{args.precision}"
                               f"{f'_n{limit}' if limit else ''}.pt")
    hit = args.cache and cache.is_file() and cache.stat().st_mtime >= path.stat().st_mtime
    if hit:
        x, y = torch.load(cache, map_location="cpu", weights_only=True).values()  # {"x", "y"}, in that order
    else:
        model, meta = common.load_backbone(ckpt)
        loader = common.eval_loader(meta, split, args.data_dir or None, args.eval_batch_size, args.workers,
                                    limit, args.dataset or None)
        x, y = common.extract_features(model.to(device), loader, device, args.precision)
        if args.cache:
            _atomic(cache, lambda f: torch.save({"x": x, "y": y}, f))
    kind = args.features if args.mode == "probe" else "backbone"  # linear-aug: the frozen backbone's
    if kind == "projector":  # its presence checked by _preflight
        heads = common.load_heads(ckpt)
        x = heads["projector"].eval().requires_grad_(False)(x)
        x = F.normalize(x, dim=1) if heads.get("normalize_output") else x
    common.print0(f"  {kind} features {split} {tuple(x.shape)} "
                  f"({'cached' if hit else f'{time.perf_counter() - t:.1f} s'})")
    return x, y


def _run_probes(args, trx, try_, tex, tey, device, eval_train=True):
    """The probes of --probes on (train, test) features, each timed on the console -> rows {probe, metric,
    value, std, shots}. eval_train: the few-shot probes are also scored on the train split. --shots given
    above the smallest train class are a usage error before any probe (default shots above it: skipped)."""
    trx, try_, tex, tey = (v.to(device) for v in (trx, try_, tex, tey))
    C, out, smallest = int(max(try_.max(), tey.max())) + 1, [], int(try_.unique(return_counts=True)[1].min())
    if "fewshot" in args.probes and max(args.shots) > smallest and args.shots != Args.shots:
        where = f"--max-train {args.max_train} subset" if args.max_train else "train split"
        raise common.UsageError(f"argument --shots: {max(args.shots)} is more than the {smallest} images of "
                                f"the smallest class in the {where}; use at most {smallest}")

    def add(probe, metric, value, std=None, shots=None):
        out.append({"probe": probe, "metric": metric, "value": value, "std": std, "shots": shots})
    for name in (p for p in ("knn", "linear", "cdnv", "fewshot") if p in args.probes.split(",")):
        t = time.perf_counter()
        if name == "knn":
            for k, T, metric in ((args.knn_k, args.knn_temperature, "cosine"),
                                 (args.knn_euclid_k, 0.07, "euclidean")):
                add("knn", f"top1_{metric}_k{k}", common.knn_accuracy(trx, try_, tex, tey, k, T, metric, C))
        elif name == "linear":
            for m, v in linear_probe(trx, try_, tex, tey, C, args.epochs or 500, args.lr or 1e-2,
                                     batch_size=args.batch_size or 1000, seed=args.seed, device=device).items():
                add("linear", m, v)
        elif name == "cdnv":
            for split, x, y in (("train", trx, try_), ("test", tex, tey)):
                add("cdnv", f"cdnv_{split}", cdnv(x, y))
                add("cdnv", f"dir_cdnv_{split}", directional_cdnv(x, y))
        else:
            rows = few_shot(trx, try_, tex, tey, args.shots, args.repeats, epochs=args.fewshot_epochs,
                            lr=args.fewshot_lr, eval_train=eval_train, seed=args.seed, device=device)
            for r in rows:
                add("fewshot", f"{r['probe']}_{r['split']}", r["mean"], r["std"], r["shots"])
            # Proposition 1 with the train split's CDNVs (the population the shots are drawn from), as an
            # error in percent: C'=2 beside the mean 2-way NCCC error, C'=C beside the C-way NCCC error.
            V, Vt = cdnv(trx, try_), directional_cdnv(trx, try_)
            for n in sorted({r["shots"] for r in rows}):
                add("fewshot", "bound_2way", 100 * few_shot_bound(Vt, V, n, 2), shots=n)
                add("fewshot", f"bound_{C}way", 100 * few_shot_bound(Vt, V, n, C), shots=n)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the time of the work, not of its launch
        common.print0(f"  {name} {time.perf_counter() - t:.1f} s")
    return out


def _train_rows(args, path, ckpt, meta, device, cache_dir):
    """--mode linear-aug | finetune on one checkpoint -> its top-1 / top-5 rows. The train set is augmented
    with crop + flip, normalised as the checkpoint's data (or as the transfer dataset)."""
    model, _ = common.load_backbone(ckpt)
    data = meta["data"]
    name, size = args.dataset or data["dataset"], int(data["image_size"])
    info = common.dataset_info(name, size)
    mean, std = (data["mean"], data["std"]) if name == data["dataset"] else (info.mean, info.std)
    aug = common.Augment(size, scale=(args.min_crop_scale, 1.0), jitter_p=0.0, gray_p=0.0, mean=mean, std=std)
    train_set = common.build_dataset(name, "train", aug, args.data_dir or data.get("data_dir"), args.download,
                                     subset=args.max_train, seed=args.seed,
                                     image_size=size if name == "digits" else None)
    C, log = train_set.num_classes, common.print0
    if args.mode == "linear-aug":
        tex, tey = _features(args, path, ckpt, "test", device, cache_dir)  # frozen: the cached ones
        tag, r = "linear_aug", linear_aug(model, train_set, tex, tey, C, args.epochs or 100, args.lr or 0.3,
                                          args.batch_size or 256, args.lr_schedule, device, args.workers,
                                          args.seed, log, args.precision)
    else:
        samples = getattr(getattr(train_set, "source", None), "samples", None)  # ImageFolder's (file, label)s
        names = None if samples is None or not args.split_file else [samples[i][0] for i in (
            range(len(samples)) if train_set.indices is None else train_set.indices.tolist())]
        idx = label_subset(train_set.targets, args.label_fraction, args.split_file or None, names, args.seed)
        pct = f"{args.label_fraction * 100:g}pct"
        tag = "finetune_" + (Path(args.split_file).stem if args.split_file else pct)
        log(f"  {tag}: {len(idx)} labelled images of {len(train_set)}")
        low = len(idx) / len(train_set) <= 0.05  # ExCB's 1% setting, else its 10% setting
        test_loader = common.eval_loader(meta, "test", args.data_dir or None, args.eval_batch_size,
                                         args.workers, args.max_test, args.dataset or None)
        lr_backbone, lr_head = args.lr_backbone or (8e-5 if low else 3e-4), args.lr or (1.0 if low else 0.2)
        r = finetune(model, torch.utils.data.Subset(train_set, idx.tolist()), test_loader, C,
                     args.epochs or 50, lr_backbone, lr_head, args.batch_size or 512, device, args.workers,
                     args.seed, log, args.precision)
    return [{"probe": tag, "metric": m, "value": r[m]} for m in ("top1", "top5")]


def _write_results(out_dir, rows):
    """Merge rows into out_dir/probe.csv and probe.json -> every row, as text: a row replaces an earlier one
    with the same KEY; rows of other probes, checkpoints, features or datasets are kept. A probe.csv of an
    older version (no unit column) merges too: every row's unit follows from its probe."""
    path = Path(out_dir) / "probe.csv"
    text = [{c: "" if r.get(c) is None else str(r[c]) for c in FIELDS} for r in rows]  # as the CSV holds them
    if path.is_file():
        with open(path, newline="") as f:
            text = [{c: r.get(c) or "" for c in FIELDS} for r in csv.DictReader(f)] + text
    order = ("checkpoint", "features", "dataset", "probe", "metric")  # after the epoch, before the shots
    final = sorted(({**r, "unit": "ratio" if r["probe"] == "cdnv" else "%"}  # the last row of each KEY
                    for r in {tuple(r[k] for k in KEY): r for r in text}.values()),
                   key=lambda r: (float(r["epoch"]), *(r[k] for k in order), float(r["shots"] or 0)))
    _atomic(path, lambda f: common.write_csv(f, final, FIELDS))  # (atomic itself; _atomic: the failure line)
    num = {"epoch": int, "value": float, "std": float, "shots": int}
    js = [{k: (num[k](float(v)) if v else None) if k in num else v for k, v in r.items()} for r in final]
    _atomic(Path(out_dir) / "probe.json", lambda f: f.write_text(json.dumps(js, indent=1)))
    return final


def _atomic(path, write):
    """write(tmp), then os.replace(tmp, path). A failed write (a full disk) removes the temporary files,
    leaves the previous file at path intact and ends the run with one line naming it (exit 1)."""
    try:
        common.write_atomic(path, write)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        for t in path.parent.glob(f".*{path.name}.tmp{os.getpid()}*"):  # a RuntimeError leaves ours behind
            t.unlink()
        why = e.strerror if isinstance(e, OSError) else "torch.save failed: is the disk full?"
        sys.exit(f"error: cannot write {path} ({why}); any previous version is intact: free space or pass "
                 f"--out-dir DIR{' or --no-cache' if path.suffix == '.pt' else ''}")


def _print_table(rows):
    """One line per checkpoint with the headline metrics, then the few-shot table of the last one."""
    def show(head, table, width):  # {row label: {column: text}}, the columns in first-seen order
        cols = list(dict.fromkeys(c for vals in table.values() for c in vals))
        for label, vals in [(head, dict(zip(cols, cols)))] + list(table.items()):
            print(f"{label:<30} " + " ".join(f"{vals.get(c, '-'):>{width}}" for c in cols))
    main, fs = {}, [r for r in rows if r["probe"] == "fewshot"]
    for r in (r for r in rows if not r["shots"]):  # rows come sorted by epoch and checkpoint
        col = f"{r['probe']}/{r['metric']}".replace("top1_", "").replace("cosine_", "cos_").replace(
            "euclidean_", "euc_")
        label = f"{r['checkpoint'][:23]:<23} {int(float(r['epoch'])):>6}"
        main.setdefault(label, {})[col] = f"{float(r['value']):.4g}"
    if main:
        show(f"{'checkpoint':<23} {'epoch':>6}", main, 16)
    if fs:
        last = max(fs, key=lambda r: (float(r["epoch"]), r["checkpoint"]))["checkpoint"]
        table, fs = {}, [r for r in fs if r["checkpoint"] == last and not r["metric"].endswith("_train")]
        for r in sorted(fs, key=lambda r: float(r["shots"])):  # train-split accuracies: in the CSV only
            std = f" +-{float(r['std']):.1f}" if r["std"] else ""
            table.setdefault(f"{int(float(r['shots'])):>5}", {})[r["metric"]] = f"{float(r['value']):.2f}{std}"
        print(f"\nfew-shot, {last} (test accuracy / error %, mean +- std over repeats; bound: NSCL Prop. 1)")
        show(f"{'N':>5}", table, 20)


def _plots(out_dir, rows, features, run):
    """probe_epoch_<features>.png: top-1 of every probe and the 1-/5-shot accuracies against the epoch (with
    several checkpoints); probe_fewshot_<ckpt>_<features>.png: the last checkpoint's few-shot accuracy and
    2-way error beside the NSCL bound, against N. Titled with the run (directory name) and the method,
    legends beside the axes (never on the data). -> the paths written."""
    from matplotlib.figure import Figure  # no pyplot: no backend, no window, nothing to close
    from matplotlib.ticker import MaxNLocator

    rows, figs, series = [r for r in rows if r["features"] == features], {}, {}  # figs: file name -> figure
    title = f"{run} ({'/'.join(sorted({r['method'] for r in rows}))}, {features} features)"
    for r in rows:  # series: curve -> {epoch: value}
        p, m, epoch = r["probe"], r["metric"], int(float(r["epoch"]))
        if (p in ("knn", "linear", "linear_aug") or p.startswith("finetune")) and m.startswith("top1"):
            series.setdefault(f"{p} {m}", {})[epoch] = float(r["value"])
        elif p == "fewshot" and m in ("nccc_test", "linear_test") and r["shots"] in ("1", "5"):
            series.setdefault(f"{m.split('_')[0]} {r['shots']}-shot", {})[epoch] = float(r["value"])
    if len({int(float(r["epoch"])) for r in rows}) > 1 and series:
        ax = Figure(figsize=(8, 4)).subplots()
        for name, pts in series.items():
            ax.plot(*zip(*sorted(pts.items())), marker="o", label=name)
        ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{title}: probes against the epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        figs[f"probe_epoch_{features}.png"] = ax.figure
    fs = [r for r in rows if r["probe"] == "fewshot"]
    if fs:
        last = max(fs, key=lambda r: (float(r["epoch"]), r["checkpoint"]))["checkpoint"]
        fs = [r for r in fs if r["checkpoint"] == last]
        shots, axes = sorted({int(float(r["shots"])) for r in fs}), Figure(figsize=(12, 4)).subplots(1, 2)
        panels = ((("nccc_test", "linear_test"), "test accuracy (%)", "linear"),
                  (("nccc_2way_err_test", "bound_2way"), "2-way error (%)", "log"))
        for ax, (metrics, unit, yscale) in zip(axes, panels):
            for m in metrics:
                pts = sorted((int(float(r["shots"])), float(r["value"]), float(r["std"] or 0)) for r in fs
                             if r["metric"] == m)
                if pts:
                    ax.errorbar(*zip(*pts), marker="o", capsize=2, label=m)
            ax.set(xscale="log", xlabel="shots per class N", ylabel=unit, yscale=yscale)
            ax.set_xticks(shots, [str(n) for n in shots])  # the N probed, not powers of ten
            ax.set_xticks([], minor=True)
        axes[1].axhline(100, color="grey", ls="--", lw=1, label="100 % (a bound above says nothing)")
        ax.figure.suptitle(f"{title}: few-shot probes of {last} and the NSCL bound (Prop. 1)", fontsize=10)
        figs[f"probe_fewshot_{Path(last).stem}_{features}.png"] = ax.figure
    for name, fig in figs.items():
        for ax in fig.axes:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: covers no point
            ax.grid(alpha=0.3)
        fig.tight_layout()
        _atomic(Path(out_dir) / name, lambda f: fig.savefig(f, dpi=120, format="png"))
    return [Path(out_dir) / name for name in figs]


def main(argv=None):
    args = common.parse_args(Args, {}, common.path_first(argv, "--path"),
                             usage="python probe.py CHECKPOINT_OR_RUN_DIR [--flag VALUE ...]")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise common.UsageError("argument --device: cuda is not available on this machine; use auto or cpu")
    device = common.select_device() if args.device == "auto" else torch.device(args.device)
    if args.mode == "bench":
        return bench(args, device)
    if not args.path:
        raise common.UsageError("give a checkpoint file or run directory: python probe.py RUN_DIR [flags]")
    out_dir = Path(args.out_dir or common.run_dir_of(args.path))  # all it writes goes below, the cache too
    cache_dir = out_dir / "features"
    metas = _preflight(args, common.list_checkpoints(args.path), out_dir)  # list_checkpoints: names only
    features = args.features if args.mode == "probe" else "backbone"
    if features != args.features:
        common.print0("note: linear-aug and finetune train on the backbone; --features ignored")
    rows, t_all, progress = [], time.perf_counter(), common.Progress("checkpoints", len(metas), "checkpoints")
    for path, meta in metas.items():
        ckpt, dataset = common.load_checkpoint(path), args.dataset or meta["data"]["dataset"]
        common.print0(f"{path.name}: {meta['method']} epoch {meta['epoch']}, {features} features, {dataset}")
        results = (_run_probes(args, *_features(args, path, ckpt, "train", device, cache_dir),
                               *_features(args, path, ckpt, "test", device, cache_dir), device)
                   if args.mode == "probe" else _train_rows(args, path, ckpt, meta, device, cache_dir))
        rows += [{"checkpoint": path.name, "epoch": meta["epoch"], "method": meta["method"],
                  "features": features, "dataset": dataset, "precision": args.precision, **r}
                 for r in results]
        progress.update()
    final = _write_results(out_dir, rows)  # each file written whole or not at all (_atomic)
    plots = _plots(out_dir, [r for r in final if r["dataset"] == rows[0]["dataset"]], features,
                   common.run_dir_of(args.path).resolve().name) if args.plots else []
    _print_table([r for r in final if (r["checkpoint"], r["features"], r["dataset"]) in
                  {(x["checkpoint"], x["features"], x["dataset"]) for x in rows}])
    common.print0("".join(f"wrote {p}\n" for p in plots) + f"wrote {out_dir / 'probe.csv'} and probe.json "
                  f"({len(rows)} rows, {time.perf_counter() - t_all:.1f} s)")


def _preflight(args, paths, out_dir):
    """What can fail, checked before any work -> {path: metadata} of the readable checkpoints. Every checkpoint
    read and fitted: a damaged or empty one stops the run naming it and --skip-damaged, or with it is skipped.
    --max-train / --max-test larger than their split (opened, not read): a usage error. An unwritable output
    (read-only, under a file, a parent that cannot be made): one line (exit 1). Nothing is written before."""
    metas = {}
    for p in paths:
        try:  # an empty file said plainly (torch raises an EOFError without a message)
            if p.stat().st_size == 0:
                raise common.CheckpointError(f"{p} is empty (0 bytes): an interrupted save or copy")
            meta = common.load_backbone(common.load_checkpoint(p))[1]
            if args.mode == "probe" and args.features == "projector" and "projector" not in meta["heads"]:
                raise common.CheckpointError(f"{p} stores no projector head (heads: {meta['heads'] or 'none'}"
                                             f"); use --features backbone")
            metas[p] = meta
        except common.CheckpointError as e:
            if not args.skip_damaged:  # the flag named when there are others to probe
                raise common.CheckpointError(f"{e}" + "; or pass --skip-damaged to probe the others"
                                             * (len(paths) > 1)) from None
            print(f"warning: {e}; skipped (--skip-damaged)", file=sys.stderr, flush=True)
    if not metas:
        raise common.CheckpointError(f"no readable checkpoint among the {len(paths)} files given")
    meta = next(iter(metas.values()))  # the checkpoints of a run share their data
    for flag, split, n in (("--max-train", "train", args.max_train), ("--max-test", "test", args.max_test)):
        ds = n and common.eval_loader(meta, split, args.data_dir or None, dataset=args.dataset or None).dataset
        if n > len(ds or ()):
            raise common.UsageError(f"argument {flag}: {n} is more than the {len(ds)} images of the {ds.name} "
                                    f"{split} split; use at most {len(ds)} (0 = all)")
    try:
        (out_dir / "features" if args.cache else out_dir).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        sys.exit(f"error: cannot write to {out_dir} ({e.strerror or e}); pass --out-dir DIR, a writable "
                 f"directory (probe.csv, probe.json, the PNGs and the feature cache go there)")
    return metas


# ----- speed benchmark: `python probe.py --mode bench` ------------------------------------------------


def bench(args, device, n_train=50000, n_test=10000, dim=512, classes=10):
    """Time the probes of --probes (as `python probe.py RUN` runs them, few-shot on the test split only) on
    synthetic Gaussian-mixture features, 50,000 x 512 train and 10,000 x 512 test in 10 classes, and, with
    linear, scikit-learn's LogisticRegression (lbfgs, C = 1) on the same features."""
    g = torch.Generator().manual_seed(args.seed)
    mu = torch.randn(classes, dim, generator=g) * 0.12
    scale = torch.rand(dim, generator=g) + 0.5  # anisotropic noise, as real features have
    feats = []
    for n in (n_train, n_test):
        y = torch.randint(0, classes, (n,), generator=g)
        feats += [mu[y] + torch.randn(n, dim, generator=g) * scale, y]
    print(f"bench on {device}, {torch.get_num_threads()} threads: train {tuple(feats[0].shape)}, "
          f"test {tuple(feats[2].shape)}")
    rows = _run_probes(args, *feats, device, eval_train=False)
    _print_table([{"checkpoint": "synthetic", "epoch": 0, **r} for r in rows])
    if "linear" in args.probes.split(","):
        from sklearn.linear_model import LogisticRegression
        t = time.perf_counter()
        clf = LogisticRegression(max_iter=1000).fit(feats[0].numpy(), feats[1].numpy())
        print(f"sklearn LogisticRegression (lbfgs, C=1): {time.perf_counter() - t:.1f} s, top-1 "
              f"{100 * clf.score(feats[2].numpy(), feats[3].numpy()):.2f} %, {clf.n_iter_[0]} iterations")


if __name__ == "__main__":
    common.run(main)
