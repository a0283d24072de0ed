"""simclr_nscl.py: SimCLR trained with NT-Xent or NSCL, and the CL-vs-NSCL loss gap (Theorem 1).

Paper: A. Luthra, T. Yang, T. Galanti, "Self-Supervised Contrastive Learning is Approximately Supervised
Contrastive Learning", NeurIPS 2025 (arXiv 2506.04411, OpenReview mf4V1SK0np).
Official code: github.com/DLFundamentals/understanding-ssl @172ce24 (Apache-2.0), checked against
utils/losses.py, utils/optimizer.py, scripts/multigpu_train_simclr.py, scripts/losses_eval.py, configs/*.yaml.
No line is copied from it. The claim: the self-supervised loss L_CL (NT-Xent) is within log(1 + e^2/(C-1))
of the negatives-only supervised loss L_NSCL (same-class images removed from the denominator), for ANY
encoder (Thm. 1), so minimising CL approximately minimises a supervised loss when C is large.

Read beside the paper's loss definitions and Thm. 1. Only the paper's first page is available to us, so
tags name equations by symbol: `# Eq. L_DCL`, `# Eq. L_NSCL`, `# Thm. 1`;
`grep -n -e "# Eq" -e "# Thm" -e OFFICIAL -e DEVIATION simclr_nscl.py` prints the map. `# OFFICIAL:` marks
where we follow the official code, `# DEVIATION n:` where we differ (numbered as in docs/simclr_nscl.md).

Commands (from the repository root):
    python simclr_nscl.py --preset digits --output-dir runs/nscl_digits    # CPU, ~1.5 min on 2 idle cores
    python simclr_nscl.py eval-gap runs/nscl_digits                         # losses.csv + fig2.png (Fig. 2)
    python simclr_nscl.py gap-vs-classes runs/nscl_digits/ckpt_epoch0005.pt # gap vs C (Fig. 3, eval form)
    python simclr_nscl.py --preset cifar10 --data-dir data --download --output-dir runs/c10_ntxent   # 1 GPU
    torchrun --standalone --nproc_per_node=8 simclr_nscl.py --preset cifar10 --loss nscl --output-dir runs/c10_nscl
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=8 simclr_nscl.py ...
    python simclr_nscl.py --preset cifar10-r18 ...                                  # fast: ResNet-18
    python probe.py runs/c10_ntxent --features projector                           # NSCL's few-shot probes on z
--batch-size is the global batch: the same run on 1, 2 or 8 GPUs (the per-rank batch is printed).
Expected time (unmeasured): ResNet-50x2 at 32 px costs 62 GFLOPs per image (2 views, forward + backward), so
the cifar10 preset (2501 epochs) is 7.8e18 FLOPs: ~5 h on one H100 at 40 % of bf16 peak (estimate).

Measured (CPU, 2 cores shared with ~5 other jobs, torch 2.14.1, seed 123; details in docs/simclr_nscl.md):
    digits preset (5 epochs, 155 s CPU): k-NN (cos, k=20) 86.9 -> 94.4 %; train gap 0.105 -> 0.162 (bound 0.599).
    CIFAR-10 JPEG, 5,000-image subset, convnet, 3 epochs (561 s): k-NN 33.1 -> 37.6 %; gap 0.104 -> 0.119.
    GPU presets: unmeasured (no GPU in this session).
"""
import math
import sys
import time
from collections import defaultdict
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

import common


def _f(default, help, **check):
    """A flag: its default, its help, and its checks (choices=(...), range="[1, inf)"; common.parse_args)."""
    return field(default=default, metadata={"help": help, **check})


@dataclass
class Args:
    # method
    loss: str = _f("ntxent", "ntxent (SimCLR, official 'DCL' runs) | dcl (decoupled NT-Xent, the paper's L_DCL) | "
                             "nscl (negatives-only supervised, official 'SCL' runs) | supcon (Khosla L_out)",
                   choices=("ntxent", "dcl", "nscl", "supcon"))
    temperature: float = _f(0.5, "tau: 0.5 on CIFAR, 0.1 on mini-ImageNet (official configs)", range="(0, inf)")
    proj_hidden: int = _f(2048, "projector hidden width (official 2048)", range="[1, inf)")
    proj_dim: int = _f(64, "projector output d: 64 CIFAR-10, 128 CIFAR-100 / mini-ImageNet", range="[1, inf)")
    # views (official utils/augmentations.py, CIFAR recipe)
    crop_scale: tuple[float, float] = _f((0.08, 1.0), "RandomResizedCrop scale range", range="(0, 1]")
    jitter: tuple[float, float, float, float] = _f((0.4, 0.4, 0.4, 0.1), "colour jitter: brightness, contrast, "
                                                                         "saturation, hue", range="[0, inf)")
    jitter_p: float = _f(0.8, "probability of colour jitter (mini-ImageNet: 1.0, always applied)", range="[0, 1]")
    gray_p: float = _f(0.2, "probability of grayscale", range="[0, 1]")
    blur_p: float = _f(0.0, "probability of Gaussian blur (CIFAR: none; mini-ImageNet: 0.1)", range="[0, 1]")
    blur_sigma: tuple[float, float] = _f((0.1, 2.0), "blur sigma range (mini-ImageNet: fixed 1.5)",
                                         range="(0, inf)")
    blur_kernel: int = _f(0, "blur kernel size in px, 0 = common.Augment's default (mini-ImageNet: 3)",
                          range="[0, inf)")
    # optimisation (official LARS port of SimCLR-TF; utils/optimizer.py)
    epochs: int = _f(2501, "training epochs (official CIFAR-10 config: 2501; 0: only epoch 0's checkpoint)",
                     range="[0, inf)")
    batch_size: int = _f(512, "GLOBAL batch over all ranks (CIFAR-10 512, CIFAR-100 1024, mini-ImageNet 896)",
                         range="[1, inf)")
    lr: float = _f(0.3, "base LR per 256 images: lr = 0.3 x batch/256 (see DEVIATION 1 for the official x2)",
                   range="(0, inf)")
    warmup_epochs: int = _f(10, "linear warm-up, multiplied into the cosine (official 10)", range="[0, inf)")
    lr_per_step: bool = _f(False, "evaluate the LR factor at fractional epochs (default: per epoch, official)")
    momentum: float = _f(0.9, "LARS momentum (classic: the LR is inside the buffer)", range="[0, 1]")
    weight_decay: float = _f(1e-6, "LARS weight decay (not on biases / BatchNorm)", range="[0, inf)")
    trust_coef: float = _f(1e-3, "LARS trust coefficient eta", range="(0, inf)")
    clip_grad: float = _f(1.0, "gradient-norm clipping (official 1.0; 0 = off)", range="[0, inf)")
    lars_official_bug: bool = _f(False, "replicate the official LARS port: decay + adapt every parameter, "
                                        "zero-norm parameters (BN shifts) frozen forever")
    # data / system
    dataset: str = _f("cifar10", "training set", choices=common.DATASETS)
    data_dir: str = _f("data", "dataset root")
    download: bool = _f(False, "download torchvision datasets")
    image_size: int = _f(32, "input resolution in px (CIFAR stem when <= 64)", range="[1, inf)")
    train_subset: int = _f(0, "class-stratified training subset size, 0 = all", range="[0, inf)")
    backbone: str = _f("resnet50", "resnet50 (official, with --width 2) | resnet18 (fast) | convnet (CPU demo)",
                       choices=common.BACKBONES)
    width: int = _f(2, "ResNet-50 width multiplier (official 2: 4096-d features)", range="[1, inf)")
    workers: int = _f(8, "data-loading workers per rank", range="[0, inf)")
    data_path: str = _f("auto", "device = images on the training device, views made there in batches; loader = "
                        "DataLoader workers; auto = device when the set fits (common.py)",
                        choices=("auto", "device", "loader"))
    seed: int = _f(123, "seed (official torch seed 123)")
    output_dir: str = _f("runs/simclr_nscl", "RUN_DIR: checkpoints ckpt_epoch{E:04d}.pt and log.jsonl")
    save_every: int = _f(50, "checkpoint period in epochs (plus epoch 0 and the last epoch)", range="[1, inf)")
    resume: str = _f("", "PATH: continue from that checkpoint (strict); auto: the newest in --output-dir, or start "
                         "fresh (resubmittable after a preemption)")
    skip_bad_images: bool = _f(False, "skip unreadable image files (counted as data/skipped_images) instead of "
                                      "stopping")
    precision: str = _f("auto", "auto = bf16 on GPUs with native bf16, fp16 + GradScaler on older GPUs, fp32 on "
                                "CPU; the losses always run in float32", choices=common.PRECISIONS)
    compile: bool = _f(False, "torch.compile the network")
    log_every: int = _f(50, "log period in steps", range="[1, inf)")


# OFFICIAL: configs/simclr_DCL_{cifar10,cifar100,imagenet}_b1024.yaml (the CIFAR-10 file holds batch 512).
PRESETS = {
    # OFFICIAL: the CIFAR-10 and mini-ImageNet configs train 2501 epochs, the CIFAR-100 config 2500
    "cifar10": dict(dataset="cifar10", batch_size=512, temperature=0.5, proj_dim=64, epochs=2501),
    "cifar100": dict(dataset="cifar100", batch_size=1024, temperature=0.5, proj_dim=128, epochs=2500),
    # mini-ImageNet (HF timm/mini-imagenet, 100 classes) as an ImageFolder: 224 px, ImageNet stem and recipe
    "imagenet-scale": dict(dataset="imagefolder", image_size=224, batch_size=896, temperature=0.1, proj_dim=128,
                           jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=1.0, blur_p=0.1, blur_sigma=(1.5, 1.5),
                           blur_kernel=3, epochs=2501),
    # not official (the official code has no ResNet-18): the fast CIFAR-10 variant
    "cifar10-r18": dict(dataset="cifar10", batch_size=512, temperature=0.5, proj_dim=64, backbone="resnet18",
                        width=1, epochs=500),
    # CPU demo: scikit-learn digits, tiny convnet, ~1 minute on 2 cores
    "digits": dict(dataset="digits", backbone="convnet", width=1, batch_size=100, proj_hidden=256, epochs=5,
                   lr=3.0, warmup_epochs=1, crop_scale=(0.25, 1.0), workers=0, save_every=1, log_every=14),
}


# ===== METHOD: SimCLR / NSCL, paper's loss definitions and Theorem 1 ==========================================
# Symbols (per rank): B images, W ranks, N = W*B images in the global batch, d embedding size, C classes,
# tau temperature. Each rank holds 2B anchors (view 1 of its images, then view 2); the candidates are the
# 2N views of the GLOBAL batch [view 1 of all ranks in rank order, then view 2]. S[a, k] = cos(z_a, z_k)/tau
# is (2B, 2N). The positive p(a) of anchor a is the other view of the same image: the ONLY positive in both
# NT-Xent and NSCL. Neg(a) is the set of negatives: NT-Xent: every view but a and p(a); NSCL: every view of
# every image of another class (same-class images are neither positives nor negatives).
#
#   coupled   l_a = -S[a,p] + log( e^S[a,p] + sum_{k in Neg(a)} e^S[a,k] )     SimCLR's NT-Xent form
#   decoupled l_a = -S[a,p] + log(             sum_{k in Neg(a)} e^S[a,k] )     the paper's equations
#
# OFFICIAL: understanding-ssl utils/losses.py names these misleadingly. Its class `NTXentLoss` (config
# `SSL`, logged as "dcl_loss") is the COUPLED NT-Xent although the paper calls the loss DCL; `WeakNTXentLoss`
# (`SCL`, "nscl_loss") is coupled NSCL; `ContrastiveLoss` (`CL`, "cl_loss") masks only self, so the positive
# sits in its denominator twice. The published curves (Fig. 2) are coupled NT-Xent vs coupled NSCL: our
# defaults. Adding e^S[a,p] to both denominators only shrinks the gap, so Thm. 1 holds for both forms.
#
# Distributed: local anchors against gathered candidates, averaged over the 2B LOCAL anchors. The gather's
# backward sums over ranks, so every rank's loss reaches every rank's embeddings; DDP then averages the W
# per-rank gradients, which gives exactly the gradient of the mean over all 2N anchors (tested).
# DEVIATION 4: the official code computes the WHOLE global loss (all 2N anchors) on every rank, and its
# GatherLayer's backward returns the local slice without summing; no term is dropped, but after DDP's average
# its parameter gradient is the right direction scaled by 1/W (measured on 2 ranks: ours = 2 x theirs, cosine 1).


def _similarities(z1, z2, temperature):
    """(B, d), (B, d) two views of this rank's images -> S (2B, 2N) float32, columns of self and of p(a).
    A float32 island whatever the caller's autocast: bf16 would round cosines by ~4e-3, i.e. ~0.01 in logits at
    tau = 0.5 and ~0.04 at tau = 0.1."""
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.stack([z1, z2], 1).float(), dim=-1)  # (B, 2, d) unit rows, float32
        zg = common.gather_with_grad(z)  # (N, 2, d), rank order; one collective for both views
        B, N = z.shape[0], zg.shape[0]
        anchors = torch.cat([z[:, 0], z[:, 1]])  # (2B, d)
        candidates = torch.cat([zg[:, 0], zg[:, 1]])  # (2N, d)
        img = common.get_rank() * B + torch.arange(B, device=z.device)  # global ids of the local images
        self_col, pos_col = torch.cat([img, img + N]), torch.cat([img + N, img])  # (2B,), (2B,)
        return anchors @ candidates.T / temperature, self_col, pos_col


def _contrast(S, pos_col, negatives, decoupled):
    """Mean over the local anchors of l_a (coupled or decoupled); negatives is the (2B, 2N) mask Neg(a)."""
    pos = S.gather(1, pos_col[:, None]).squeeze(1)  # (2B,)
    log_neg = S.masked_fill(~negatives, float("-inf")).logsumexp(1)  # (2B,) log sum over Neg(a)
    log_denominator = log_neg if decoupled else torch.logaddexp(log_neg, pos)
    return (log_denominator - pos).mean()


def nt_xent_loss(z1, z2, temperature=0.5, decoupled=False):
    """SimCLR's NT-Xent over the 2N views of the global batch (coupled: positive once in the denominator).
    decoupled=True is the paper's L_DCL (Yeh et al.): the positive is removed from the denominator."""
    S, self_col, pos_col = _similarities(z1, z2, temperature)
    cols = torch.arange(S.shape[1], device=S.device)
    negatives = (cols != self_col[:, None]) & (cols != pos_col[:, None])  # (2B, 2N)
    return _contrast(S, pos_col, negatives, decoupled)  # Eq. L_DCL (decoupled); coupled = official "DCL" runs


def nscl_loss(z1, z2, labels, temperature=0.5, decoupled=False):
    """Negatives-only supervised contrastive loss: NT-Xent with every view of every same-class image removed
    from the denominator; the positive is still only the other view of the same image. labels: (B,)."""
    S, _, pos_col = _similarities(z1, z2, temperature)
    y = common.all_gather_nograd(labels)  # (N,) labels of the global batch, same order as the candidates
    negatives = labels.repeat(2)[:, None] != y.repeat(2)[None, :]  # (2B, 2N); also drops self and p(a)
    has_negative = negatives.any(1).all()
    msg = "nscl_loss: an anchor has no negative (its class fills the global batch); use class-balanced batches"
    if S.is_cuda:
        torch._assert_async(has_negative, msg)  # no host sync per step; a failure is fatal, as it should be
    elif not has_negative:
        raise ValueError(msg)
    return _contrast(S, pos_col, negatives, decoupled)  # Eq. L_NSCL (decoupled); coupled = official code


def supcon_loss(z1, z2, labels, temperature=0.5):
    """Supervised contrastive loss L_out (Khosla et al. 2020, Eq. 2), the fully supervised reference:
    positives P(a) = every other view of the same class (p(a) included), denominator = every view but a."""
    S, self_col, _ = _similarities(z1, z2, temperature)
    y = common.all_gather_nograd(labels)
    cols = torch.arange(S.shape[1], device=S.device)
    not_self = cols != self_col[:, None]  # (2B, 2N)
    positives = (labels.repeat(2)[:, None] == y.repeat(2)[None, :]) & not_self  # (2B, 2N), >= 1 per row
    log_prob = S - S.masked_fill(~not_self, float("-inf")).logsumexp(1, keepdim=True)  # (2B, 2N)
    # DEVIATION 5: no tau/base_tau factor (Khosla's code scales the loss by the constant tau/0.07)
    return -(log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1)).mean()


def theorem1_bound(num_classes, temperature=1.0):
    """Thm. 1: 0 <= L_CL - L_NSCL <= log(1 + e^2/(C-1)) for any encoder, balanced classes, tau = 1.
    Proof idea: each exp(cos/tau) lies in [e^-1/tau, e^1/tau], and an anchor's same-class views are fewer
    than 1/(C-1) times its other-class views. At another tau, e^2 becomes e^(2/tau) (very loose at 0.1)."""
    return math.log1p(math.exp(2.0 / temperature) / (num_classes - 1))  # Thm. 1


def equal_similarity_losses(batch_size, num_classes):
    """Coupled losses when every cosine is equal (an encoder at init is close to this): NT-Xent =
    log(2B-1), NSCL = log(1 + 2B(1-1/C)) on a balanced batch of B images. OFFICIAL logs: B 1024, C 10 -> gap
    0.104 predicted, 0.106 logged at epoch 0."""
    return math.log(2 * batch_size - 1), math.log1p(2 * batch_size * (1 - 1 / num_classes))


LOSSES = {
    "ntxent": lambda z1, z2, y, tau: nt_xent_loss(z1, z2, tau),
    "dcl": lambda z1, z2, y, tau: nt_xent_loss(z1, z2, tau, decoupled=True),
    "nscl": lambda z1, z2, y, tau: nscl_loss(z1, z2, y, tau),
    "supcon": lambda z1, z2, y, tau: supcon_loss(z1, z2, y, tau),
}


def build_projector(feature_dim, hidden_dim, out_dim):
    """g: Linear-BN-ReLU-Linear-BN (no Linear biases); z = g(h) / ||g(h)|| (the losses normalise)."""
    g = nn.Sequential(nn.Linear(feature_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
                      nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim))
    g[-1].bias.requires_grad_(False)  # OFFICIAL: models/*.py freezes the last BN's shift at 0 (scale trained)
    # DEVIATION 8: the official constructor calls torch.manual_seed(42); ours is initialised from --seed
    return g


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in SimCLR-TF with classic momentum, written from the equations:
        d = g + wd * w;   ratio = eta * ||w|| / ||d|| (1 if either norm is 0);   v = m v + lr * ratio * d;   w -= v
    Parameter groups with adapt=False (biases, BatchNorm) take ratio 1 and weight_decay 0, as in SimCLR-TF.
    OFFICIAL bug (utils/optimizer.py): it adapts and decays EVERY parameter and tests `||w|| >= 0`, so a
    zero-norm parameter gets ratio 0 and never moves: every zero-initialised BN shift stays 0 for the whole
    run. freeze_zero_norm=True (with one group holding everything) replicates it: --lars-official-bug."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, trust_coef=1e-3, freeze_zero_norm=False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef, adapt=True)
        super().__init__(params, defaults)
        self.freeze_zero_norm = freeze_zero_norm

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    w_norm, d_norm = p.norm(), d.norm()
                    valid = d_norm > 0 if self.freeze_zero_norm else (w_norm > 0) & (d_norm > 0)
                    d.mul_(torch.where(valid, group["trust_coef"] * w_norm / d_norm, 1.0))  # no host sync
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                v = state["momentum_buffer"].mul_(group["momentum"]).add_(d, alpha=group["lr"])
                p.sub_(v)


def lars_param_groups(model, weight_decay, official_bug=False):
    """Weights of Linear / conv layers: decayed and adapted. Biases and BatchNorm (1-D tensors): neither."""
    params = [p for p in model.parameters() if p.requires_grad]
    if official_bug:
        return [dict(params=params, weight_decay=weight_decay)]
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0, adapt=False)]


def lr_factor(epoch, total_epochs, warmup_epochs=10):
    """OFFICIAL: LambdaLR factor min(1, (e+1)/warmup) * 0.5 (1 + cos(pi e / E)): the linear warm-up is
    MULTIPLIED into the cosine (not warm-up then cosine); e is the epoch index (per-epoch steps)."""
    warmup = min(1.0, (epoch + 1) / warmup_epochs) if warmup_epochs > 0 else 1.0
    return warmup * 0.5 * (1.0 + math.cos(math.pi * epoch / total_epochs))


@torch.no_grad()
def batch_diagnostics(z1, z2, labels):
    """Log-step monitors (not part of the loss): mean positive cosine and the Thm. 1 gap on this batch."""
    cos = F.cosine_similarity(z1.float(), z2.float(), dim=1).mean()
    gap = nt_xent_loss(z1, z2, 1.0) - nscl_loss(z1, z2, labels, 1.0)  # Thm. 1 measured at tau = 1
    return {"nscl/pos_cos": common.all_reduce_mean(cos), "nscl/gap_tau1": common.all_reduce_mean(gap)}


# ===== VIEWS: official CIFAR recipe (utils/augmentations.py) ==================================================
def augment(args, info):
    """One training view: crop (0.08-1), flip, jitter 0.4/0.4/0.4/0.1 (p 0.8), grayscale 0.2, no blur (CIFAR);
    mini-ImageNet: jitter 0.8/0.8/0.8/0.2 always, blur k 3, sigma 1.5, p 0.1 (the imagenet-scale preset)."""
    return common.Augment(info.image_size, scale=args.crop_scale, jitter=args.jitter, jitter_p=args.jitter_p,
                          gray_p=args.gray_p, blur_p=args.blur_p, blur_sigma=args.blur_sigma,
                          blur_kernel=args.blur_kernel or None, mean=info.mean, std=info.std)


def train_views(args, info):
    """SimCLR: two independent draws of the same recipe."""
    t = augment(args, info)
    return common.MultiView([t, t])


class ClassBalancedBatchSampler:
    """Class-balanced global batches, split over ranks (what makes NSCL well defined: every anchor keeps
    negatives of other classes; OFFICIAL: DistributedStratifiedBatchSampler). --loss nscl | supcon use it.

    Per epoch, each class's indices are shuffled (seed + epoch, identical on all ranks), interleaved
    round-robin over classes and cut into consecutive global batches of `global_batch_size`; each batch
    then holds global_batch_size / C images of every class (+-1 when C does not divide it). Rank r takes
    the r-th contiguous chunk of each global batch; a chunk of a round-robin sequence is itself balanced
    (+-1), so the ranks' slices are disjoint and balanced too. The incomplete last batch is dropped; every
    other index appears exactly once per epoch."""

    def __init__(self, targets, global_batch_size, dist, seed=0):
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        if global_batch_size % dist.world_size:
            raise ValueError(f"batch size {global_batch_size} is not divisible by {dist.world_size} ranks")
        self.batch, self.dist, self.seed, self.epoch = global_batch_size, dist, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.targets) // self.batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        per_class = [torch.nonzero(self.targets == c).flatten() for c in torch.unique(self.targets)]
        per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
        order = [int(idx[k]) for k in range(max(map(len, per_class)))  # round-robin: one image of each class
                 for idx in per_class if k < len(idx)]                  # that still has one
        per_rank = self.batch // self.dist.world_size
        for b in range(len(self)):
            start = b * self.batch + self.dist.rank * per_rank
            yield order[start:start + per_rank]


# ===== TRAINING LOOP: plumbing =================================================================================
def main(argv=None):
    args = common.parse_args(Args, PRESETS, argv)
    dist = common.setup_distributed()
    common.check_writable(args.output_dir)  # a bad --output-dir fails now, in one line, not after an epoch
    device = dist.device
    common.seed_everything(args.seed)  # same seed on every rank: identical initial weights
    torch.backends.cudnn.benchmark = True
    per_rank = common.split_batch(args.batch_size, dist.world_size)  # GLOBAL batch -> per-rank batch
    # DEVIATION 2: --precision auto is bf16 on GPUs that have it (official: fp16 autocast + GradScaler, which is
    # --precision fp16); the losses run in float32 in every mode
    prec = common.MixedPrecision(args.precision, device)

    # data: NSCL / SupCon need class-balanced global batches
    info = common.dataset_info(args.dataset, args.image_size)
    if args.dataset == "cifar100":  # OFFICIAL: utils/augmentations.py normalises CIFAR-100 with CIFAR-10's mean
        info = dataclasses.replace(info, mean=common.dataset_info("cifar10").mean,  # (std: see DEVIATION 7)
                                   std=common.dataset_info("cifar10").std)
    train_set = common.build_dataset(args.dataset, "train", train_views(args, info), args.data_dir, args.download,
                                     subset=args.train_subset, seed=args.seed, image_size=info.image_size,
                                     skip_bad=args.skip_bad_images)
    sampler = (ClassBalancedBatchSampler(train_set.targets, args.batch_size, dist, seed=args.seed)  # batch/C
               if args.loss in ("nscl", "supcon") else None)  # images per class (+-1 if C does not divide it)
    loader = common.build_train_loader(train_set, per_rank, dist, args.data_path, args.workers, seed=args.seed,
                                       batch_sampler=sampler)
    steps_per_epoch, total_steps = len(loader), len(loader) * args.epochs
    common.print0(f"{len(train_set)} images, C = {train_set.num_classes}, global batch {args.batch_size} = "
                  f"{dist.world_size} x {per_rank} per rank{' (class-balanced)' if sampler else ''}, "
                  f"{steps_per_epoch} steps/epoch, precision {prec.name}")

    # network: backbone f -> h, projector g -> z (normalised inside the losses)
    backbone, feature_dim = common.build_backbone(args.backbone, info.image_size, width=args.width)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = nn.Sequential(backbone, build_projector(feature_dim, args.proj_hidden, args.proj_dim))
    model = model.to(device, memory_format=fmt)
    ddp_model = common.ddp_wrap(model, dist)  # SyncBatchNorm (CUDA) + DDP when W > 1
    model = common.unwrap(ddp_model)  # the plain network (SyncBN-converted in place), for checkpoints
    forward = torch.compile(ddp_model) if args.compile else ddp_model

    # optimiser: LARS; weights adapted + decayed, biases / BN neither (unless --lars-official-bug)
    # DEVIATION 1: the official v1 code also multiplies by its world size (2 GPUs) with a global batch: x2
    base_lr = args.lr * args.batch_size / 256
    # DEVIATION 3 (default): proper LARS; --lars-official-bug reproduces the official optimiser
    optimizer = LARS(lars_param_groups(model, args.weight_decay, args.lars_official_bug), lr=base_lr,
                     momentum=args.momentum, weight_decay=args.weight_decay, trust_coef=args.trust_coef,
                     freeze_zero_norm=args.lars_official_bug)

    def lr_at(step):  # OFFICIAL: per-epoch LambdaLR; a pure function of the global step, so resume is exact
        epoch = step / steps_per_epoch if args.lr_per_step else step // steps_per_epoch
        return base_lr * lr_factor(epoch, args.epochs, args.warmup_epochs)

    # resume (strict: every tensor of model, optimiser and GradScaler must match): --resume PATH | auto
    step = 0
    ckpt = common.resume_checkpoint(args, "simclr_nscl")
    if ckpt is not None:
        common.load_train_state(ckpt, args, model=model, optimizer=optimizer, scaler=prec)  # strict
        step = ckpt["step"]
        del ckpt
        common.print0(f"resumed at epoch {step // steps_per_epoch}, step {step}")

    logger = common.RunLogger(args.output_dir, dist, total_steps, start_step=step)
    logger.write_config({"config": dataclasses.asdict(args), "precision": prec.name, "start_step": step})
    guard = common.DivergenceGuard(device, steps_per_epoch, total_steps, lr_at, args.output_dir)
    stop = common.StopSignal(dist)

    def save(epoch, mid_epoch=False):  # every rank calls it (the guard's check is collective); rank 0 writes
        guard.check()  # never a checkpoint of a diverged state
        if not dist.is_main:
            return
        state = common.make_checkpoint(
            "simclr_nscl", epoch, step, args,
            common.backbone_spec(args.backbone, info.image_size, width=args.width), model[0], "online",
            info, train_state={"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scaler": prec.state_dict()},
            heads={"projector": model[1], "normalize_output": True}, precision=prec.name)
        common.save_checkpoint(Path(args.output_dir) / common.checkpoint_name(epoch, step if mid_epoch else None),
                               state)
        common.prune_interrupted(args.output_dir, step)

    if step == 0:
        save(0)  # the paper's curves start at initialisation
    t0, start_step = time.perf_counter(), step
    for epoch in range(step // steps_per_epoch, args.epochs):
        loader.set_epoch(epoch, start_batch=step - epoch * steps_per_epoch)  # > 0 only after a mid-epoch stop
        ddp_model.train()
        for (x1, x2), y in logger.timed(loader):
            common.seed_step(args.seed, step, dist.rank)
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # both views in one forward: BatchNorm statistics over all 2B views, as SimCLR
            x = torch.cat([x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)]).contiguous(
                memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with prec.autocast():
                z = forward(x)
            z1, z2 = z.float().chunk(2)  # (B, d) each; the losses run in float32 outside autocast
            loss = LOSSES[args.loss](z1, z2, y, args.temperature)
            optimizer.zero_grad(set_to_none=True)
            prec.scaler.scale(loss).backward()  # the scaler is a no-op outside fp16
            if args.clip_grad > 0:  # OFFICIAL: clip the global gradient norm at 1.0 before LARS (unscaled in fp16)
                prec.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            prec.scaler.step(optimizer)
            prec.scaler.update()
            step += 1
            guard.update(loss, step)
            if step % args.log_every == 0 or step == total_steps:
                guard.check()
                extra = batch_diagnostics(z1.detach(), z2.detach(), y)
                extra["data/skipped_images"] = loader.skipped_images
                logger.step_line(epoch, step, common.all_reduce_mean(loss.detach()), lr, args.batch_size, extra)
            if stop():  # SIGTERM / SIGUSR1 (preemption): every rank leaves after this same step
                break
        # the one exit path: at the epoch's end a checkpoint if due (OFFICIAL cadence: every 10 epochs below 100,
        # for Fig. 2's log-scale x, then every --save-every); on a stop signal a mid-epoch one (unless just
        # written); then leave
        done = epoch + 1
        due = step == done * steps_per_epoch and (done % args.save_every == 0 or (done < 100 and done % 10 == 0)
                                                  or done == args.epochs)
        if due or stop.stopping:
            save(done if due else step // steps_per_epoch, mid_epoch=not due)
        if stop.stopping:
            common.print0(f"stopped by a signal after step {step}; rerun the same command with --resume auto")
            break
    stop.close()
    common.print0(f"done: {step - start_step} steps in {time.perf_counter() - t0:.0f} s -> {args.output_dir}")
    common.cleanup_distributed()


# ===== THE PAPER'S MEASUREMENTS: loss gap over training (Fig. 2) and against C (Fig. 3) =======================
# OFFICIAL protocol (scripts/losses_eval.py): tau forced to 1 whatever the training tau; the whole train and
# test sets; each pair = one training-augmented view and one clean view; random batches of the TRAINING batch
# size (the gap at init, log(2B-1) - log(1+2B(1-1/C)), depends on B); mean over batches; every checkpoint.
def pair_batches(meta, split, batch_size, data_dir=None, subset=0, workers=0, seed=0, cache_gb=0.0):
    """Batches of ((augmented view, clean view), label) for a checkpoint's dataset; the views are fixed by
    seed, so when they fit in cache_gb (as float16) they are augmented once and reused for every checkpoint."""
    data = meta["data"]
    known = {f.name for f in dataclasses.fields(Args)}
    args = Args(**{k: v for k, v in meta["args"].items() if k in known})
    info = common.DataInfo(data["dataset"], data["num_classes"], data["image_size"], tuple(data["mean"]),
                           tuple(data["std"]))
    clean = common.eval_transform(info.image_size, info.mean, info.std)  # 256 -> 224 crop on ImageNet
    ds = common.build_dataset(info.name, split, common.MultiView([augment(args, info), clean]),
                              data_dir or data["data_dir"], subset=subset, seed=seed, image_size=info.image_size)
    loader = common.build_loader(ds, batch_size, common.DistInfo(device=common.select_device()), workers,
                                 shuffle=False, drop_last=False, seed=seed)
    loader.set_epoch(0)
    if len(ds) * 2 * 3 * info.image_size ** 2 * 2 > cache_gb * 2 ** 30:
        return loader
    return [((xa.half(), xc.half()), y) for (xa, xc), y in loader]  # fp16 is finer than 8-bit pixels


@torch.no_grad()
def embed_pairs(encoder, loader, device):
    """-> z of the augmented views (N, d), z of the clean views (N, d), labels (N,); float32 on CPU, computed in
    float32 (no autocast: the gap is a difference of two close losses, which bf16 rounding would blur)."""
    za, zc, ys = [], [], []
    encoder.eval()
    for (xa, xc), y in loader:
        a, c = encoder(torch.cat([xa, xc]).to(device).float()).float().chunk(2)
        za.append(a), zc.append(c), ys.append(y)
    return torch.cat(za).cpu(), torch.cat(zc).cpu(), torch.cat(ys)


def gap_losses(z_aug, z_clean, labels, batch_size, seed=0):
    """Mean over random batches of the tau = 1 losses, coupled (official, Fig. 2) and decoupled (paper)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    B = min(batch_size, len(labels))
    sums, n = defaultdict(float), len(labels) // B
    for idx in order[:n * B].view(n, B):  # DEVIATION 6: the incomplete last batch is dropped (< B images)
        a, c, y = z_aug[idx], z_clean[idx], labels[idx]
        for form, decoupled in (("", False), ("_decoupled", True)):
            sums["ntxent" + form] += nt_xent_loss(a, c, 1.0, decoupled).item()
            sums["nscl" + form] += nscl_loss(a, c, y, 1.0, decoupled).item()
    out = {k: v / n for k, v in sums.items()}
    out["gap"], out["gap_decoupled"] = out["ntxent"] - out["nscl"], out["ntxent_decoupled"] - out["nscl_decoupled"]
    return out


def _load_encoder(path, device):
    backbone, meta = common.load_backbone(path)
    return nn.Sequential(backbone, common.load_heads(path)["projector"]).to(device), meta


def plot_fig2(rows, bound, path, title):
    """Fig. 2 (top) of the paper: NT-Xent and NSCL over training next to NSCL + bound; right: the gap."""
    fig = Figure(figsize=(11, 4))  # matplotlib's object API: no pyplot state, no backend to pick
    ax1, ax2 = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    for split, style in (("train", "-"), ("test", "--")):
        if f"{split}_gap" not in rows[0]:
            continue
        col = lambda k: [r[f"{split}_{k}"] for r in rows]  # noqa: E731
        ax1.plot(epochs, col("ntxent"), "C0" + style, marker=".", label=f"NT-Xent ({split})")
        ax1.plot(epochs, col("nscl"), "C1" + style, marker=".", label=f"NSCL ({split})")
        ax1.plot(epochs, [v + bound for v in col("nscl")], "C2" + style, label=f"NSCL + bound ({split})")
        ax2.plot(epochs, col("gap"), "C3" + style, marker=".", label=f"NT-Xent - NSCL ({split})")
    ax2.axhline(bound, color="k", ls=":", label=f"Thm. 1: log(1 + e^2/(C-1)) = {bound:.3f}")
    ax2.set_ylim(bottom=0)
    for ax, ylabel in ((ax1, "loss at tau = 1 (nats)"), (ax2, "gap NT-Xent - NSCL (nats)")):
        ax.set(xscale="symlog", xlabel="epoch (symlog)", ylabel=ylabel)
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")  # whole epochs: 0, 1, 10, 100
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.15), ncol=2)  # below: covers no curve
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def eval_gap(argv):
    """`python simclr_nscl.py eval-gap RUN_DIR [RUN_DIR ...]`: Thm. 1 over training -> losses.csv, fig2.png."""
    p = common.ArgParser(prog="simclr_nscl.py eval-gap", description=eval_gap.__doc__)  # errors: one line
    p.add_argument("runs", nargs="+", help="run directories (every *.pt in epoch order) or checkpoint files")
    p.add_argument("--batch-size", type=common.ranged(int, "[0, inf)"), default=0,
                   help="evaluation batch B (0 = the run's training batch)")
    p.add_argument("--splits", nargs="+", default=["train", "test"], choices=("train", "test"))
    p.add_argument("--subset", type=common.ranged(int, "[0, inf)"), default=0,
                   help="class-stratified subset per split (0 = all, the paper)")
    p.add_argument("--data-dir", default=None, help="override the data directory stored in the checkpoints")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="fixes the views and batches (shared by all checkpoints)")
    p.add_argument("--cache-gb", type=float, default=4.0, help="keep the evaluation views in memory up to this")
    p.add_argument("--compare", default="", help="PNG of every run's NSCL loss together (Fig. 2 bottom)")
    a = p.parse_args(argv)
    device, curves = common.select_device(), []
    for run in a.runs:
        paths, rows, loaders = common.list_checkpoints(run), [], {}
        out_dir, progress = common.check_writable(common.run_dir_of(run)), common.Progress("eval-gap", len(paths),
                                                                                            "checkpoints")
        for path in paths:
            encoder, meta = _load_encoder(path, device)
            B = a.batch_size or meta["args"]["batch_size"]
            row = {"epoch": meta["epoch"]}
            for split in a.splits:
                if split not in loaders:
                    loaders[split] = pair_batches(meta, split, 256, a.data_dir, a.subset, a.workers, a.seed,
                                                  a.cache_gb)
                z_aug, z_clean, y = embed_pairs(encoder, loaders[split], device)
                row.update({f"{split}_{k}": v for k, v in gap_losses(z_aug, z_clean, y, B, a.seed).items()})
            C = len(torch.unique(y))
            row.update(batch=B, C=C, bound=theorem1_bound(C))  # Thm. 1
            rows.append(row)
            common.print0(f"{path.name}: " + " ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                       if k.endswith(("ntxent", "nscl", "gap"))))
            progress.update()
        common.write_csv(out_dir / "losses.csv", rows, list(rows[0]))
        plot_fig2(rows, rows[0]["bound"], out_dir / "fig2.png",
                  f"{out_dir.name} ({meta['method']}, --loss {meta['args']['loss']}) on {meta['data']['dataset']}: "
                  f"Thm. 1 over training, B = {B}, C = {C}")
        common.print0(f"wrote {out_dir / 'losses.csv'} and {out_dir / 'fig2.png'}")
        curves.append((f"trained with {meta['args']['loss']}", rows))
    if a.compare:  # Fig. 2 (bottom): NSCL loss of a CL-trained vs an NSCL-trained model
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for label, rows in curves:
            ax.plot([r["epoch"] for r in rows], [r[f"{a.splits[0]}_nscl"] for r in rows], marker=".", label=label)
        ax.set(xscale="symlog", xlabel="epoch (symlog)", ylabel=f"NSCL loss at tau = 1, nats ({a.splits[0]})",
               title=f"NSCL loss of {', '.join(common.run_dir_of(r).name for r in a.runs)} (Fig. 2 bottom)")
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
        ax.legend()
        fig.savefig(a.compare, dpi=120, bbox_inches="tight")


def gap_vs_classes(argv):
    """`python simclr_nscl.py gap-vs-classes CKPT`: the gap on random C-class subsets of one model (Fig. 3,
    evaluation form; the paper trains one model per C) -> gap_vs_classes.csv / .png next to CKPT."""
    p = common.ArgParser(prog="simclr_nscl.py gap-vs-classes", description=gap_vs_classes.__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--classes", type=common.ranged(int, "[2, inf)"), nargs="+", default=None,
                   help="values of C (default: 2 4 6 8 10 50 up to the dataset's C, as the v2 code)")
    p.add_argument("--repeats", type=common.ranged(int, "[1, inf)"), default=5, help="random class subsets per C")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--batch-size", type=int, default=0, help="evaluation batch (0 = the run's training batch)")
    p.add_argument("--subset", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    device = common.select_device()
    encoder, meta = _load_encoder(a.checkpoint, device)
    loader = pair_batches(meta, a.split, 256, a.data_dir, a.subset, a.workers, a.seed)
    z_aug, z_clean, y = embed_pairs(encoder, loader, device)
    classes = torch.unique(y)
    total_C, B = len(classes), a.batch_size or meta["args"]["batch_size"]
    g = torch.Generator().manual_seed(a.seed)
    rows = []
    for C in a.classes or sorted({c for c in (2, 4, 6, 8, 10, 50) if c < total_C} | {total_C}):
        gaps, batch = [], B
        for r in range(a.repeats):
            keep = torch.isin(y, classes[torch.randperm(total_C, generator=g)[:C]])
            batch = min(B, int(keep.sum()))
            gaps.append(gap_losses(z_aug[keep], z_clean[keep], y[keep], batch, a.seed + r)["gap"])
        gaps = torch.tensor(gaps, dtype=torch.float64)
        rows.append(dict(C=C, gap_mean=gaps.mean().item(), gap_std=gaps.std(unbiased=False).item(), batch=batch,
                         bound=theorem1_bound(C), gap_equal_similarity=math.log(2 * batch - 1) -
                         math.log1p(2 * batch * (1 - 1 / C))))
        common.print0(" ".join(f"{k} {v:.4g}" for k, v in rows[-1].items()))
    out = Path(a.checkpoint).with_name(f"gap_vs_classes_{Path(a.checkpoint).stem}")
    common.write_csv(out.with_suffix(".csv"), rows, list(rows[0]))
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    Cs = [r["C"] for r in rows]
    ax.errorbar(Cs, [r["gap_mean"] for r in rows], [r["gap_std"] for r in rows], marker="o",
                label="NT-Xent - NSCL")
    ax.plot(Cs, [r["bound"] for r in rows], "k:", label="Thm. 1: log(1 + e^2/(C-1))")
    ax.plot(Cs, [r["gap_equal_similarity"] for r in rows], "C7--", label="all cosines equal (init)")
    ax.set(xscale="log", yscale="log", xlabel="number of classes C", ylabel=f"gap at tau = 1, nats ({a.split})",
           title=f"{common.run_dir_of(a.checkpoint).name} ({meta['method']}, --loss {meta['args']['loss']}), "
                 f"epoch {meta['epoch']}: gap vs C (Fig. 3)")
    ax.set_xticks(Cs, [str(c) for c in Cs])
    ax.minorticks_off()
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1))  # outside: covers no point
    fig.savefig(out.with_suffix(".png"), dpi=120, bbox_inches="tight")
    common.print0(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    COMMANDS = {"eval-gap": eval_gap, "gap-vs-classes": gap_vs_classes}
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        common.run(lambda: COMMANDS[sys.argv[1]](sys.argv[2:]))
    else:
        common.run(main)
