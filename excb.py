"""ExCB: Explicit Cluster Balancing, one file.

Paper:   I. Maniadis Metaxas, G. Tzimiropoulos, I. Patras, "Efficient Unsupervised Visual Representation
         Learning with Explicit Cluster Balancing", ECCV 2024, arXiv 2407.11168.
Official code (no license file, so nothing is copied): github.com/ManiadisG/ExCB @ 7750bd5, checked against
engine/criterion.py, engine/model.py, engine/trainer.py, engine/optimizer.py, architectures/layers.py,
utils/misc.py, data/transforms.py and configs/{main_config,resnet50_ep400,vit_s16_ep800}.yaml.

Idea: a student matches the teacher's (EMA) soft assignment of each image to K learned centroids. Collapse is
prevented by measuring every cluster's relative size s over many batches (hard assignments, EMA) and by
bending the teacher's cosine similarities toward 1 for undersized and toward -1 for oversized clusters
(the balancing operator B of Eq. (10)), so no large batch and no Sinkhorn is needed.

Read beside Sec. 3 and Algorithm 1-2. Every line that implements the paper carries `# Eq. (n)` / `# Alg. n`,
`# OFFICIAL:` where we follow the official code over the paper, `# DEVIATION:` where we differ, so
`grep -n "Eq\.\|Alg\.\|OFFICIAL\|DEVIATION" excb.py` prints the map, in the order of one training step.

Commands (expected time / result; docs/excb.md has the details):
  python excb.py --preset digits --output-dir runs/excb_digits          # CPU, 100-120 s on 2 shared cores
  python excb.py --preset cifar10 --data-dir data --download --output-dir runs/excb_c10   # 1 GPU, our port
  torchrun --nproc_per_node=4 excb.py --preset imagenet --data-dir /data/imagenet --output-dir runs/in1k
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
      excb.py --preset imagenet_vits --data-dir /data/imagenet --output-dir runs/in1k_vits
  --batch-size is GLOBAL and --lr is absolute for it (official): a preset is the same run on 1 or 16 GPUs.

Measured (torch 2.14.1, CPU: 2 cores shared with other jobs, device data path; details in docs/excb.md):
  digits preset: 110 steps in 5 s (~1,200 img/s); last-epoch clusters 0.82-1.11 x N/K, none empty; k-NN ~94 %
  CIFAR-10 JPEG, 5k images, 16 px convnet, K=128, 234 steps (19 s of steps): teacher 20-NN 30.1 -> 34.9 %, clusters
  0.94-1.10 x N/K, none empty. GPU presets (cifar10, imagenet, imagenet_vits): unmeasured (no GPU here).
"""
import copy
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


def _f(default, help, **check):
    """A flag: its default, its help, and its checks (choices=(...), range="[1, inf)"; common.parse_args)."""
    return field(default=default, metadata={"help": help, **check})


@dataclass
class Args:
    # --- method (Sec. 3, Sec. 4.1; official configs/main_config.yaml) ---
    num_clusters: int = _f(65536, "K centroids (official 65,536; keep K well below the images)", range="[2, inf)")
    tau_t: float = _f(0.04, "tau_t, teacher temperature, constant (official 0.04, no warm-up)", range="(0, inf)")
    tau_s: float = _f(0.1, "tau_s, student temperature (official 0.1)", range="(0, inf)")
    size_momentum: float = _f(0.999, "m_s, per-step EMA momentum of the cluster sizes s (Eq. 9)", range="[0, 1]")
    boost_top: bool = _f(True, "OFFICIAL code-only step: x1.01 on each row's top balanced cosine, clamp [-1,1]")
    ema_base: float = _f(0.996, "m, teacher EMA momentum at step 0, cosine to 1 over the run, per step",
                         range="[0, 1]")
    proj_hidden: int = _f(2048, "projector h / predictor g hidden width", range="[1, inf)")
    proj_dim: int = _f(256, "D, projector and predictor output (centroid) dimension", range="[1, inf)")
    head_style: str = _f("resnet", "resnet: Linear-BN-ReLU heads; vit: GELU heads without hidden BN (ViT config)",
                         choices=("resnet", "vit"))
    kmeans_init: bool = _f(True, "initialise the centroids by spherical k-means on the random teacher (official)")
    kmeans_samples: int = _f(500_000, "images whose teacher projection feeds the k-means (official 500k)",
                             range="[1, inf)")
    kmeans_iters: int = _f(50, "k-means iterations per attempt (official 50)", range="[1, inf)")
    kmeans_tries: int = _f(10, "k-means restarts until no cluster is empty, then a clear error", range="[1, inf)")
    centroid_wd_factor: float = _f(10.0, "f: centroid wd = wd (1 + (f-1) c(t)), c: cosine 1->0", range="[0, inf)")
    # --- views (official data/transforms.py; DINO-style multi-crop) ---
    n_local: int = _f(6, "L, local crops (official 6; 0 = the paper's no-multi-crop setting)", range="[0, inf)")
    local_size: int = _f(96, "local crop size in pixels (official 96 at 224)", range="[1, inf)")
    global_min_scale: tuple[float, float] = _f((0.26, 0.14), "global crops' min scale m(e): cosine per epoch, "
                                               "first -> second value (official 0.26 -> 0.14)", range="(0, 1]")
    local_min_scale: float = _f(0.05, "local crop scale range is (this, m(e))", range="(0, 1]")
    blur_p: tuple[float, float, float] = _f((0.0, 0.9, 0.0), "blur prob. of global 1, global 2, local crops as "
                                            "the official code APPLIES them (it inverts p); paper: 1.0 0.1 1.0",
                                            range="[0, 1]")
    solarize_p: tuple[float, float] = _f((0.0, 0.2), "solarize p of global views 1, 2 (local: 0)", range="[0, 1]")
    # --- optimisation (Sec. 4.1; official engine/optimizer.py) ---
    optimizer: str = _f("sgd", "sgd (momentum 0.9) or adamw (ViT)", choices=("sgd", "adamw"))
    epochs: int = _f(400, "training epochs (0: only the --save-epoch0 checkpoint)", range="[0, inf)")
    batch_size: int = _f(1024, "GLOBAL batch over all ranks (per-rank = batch_size / world_size)", range="[1, inf)")
    lr: float = _f(0.6, "peak lr for the GLOBAL batch, absolute (official 0.6 at 1024; paper: 0.15 x batch/256)",
                   range="(0, inf)")
    final_lr_ratio: float = _f(1e-4, "cosine floor as a fraction of lr (official 1e-4)", range="[0, 1]")
    warmup_epochs: float = _f(10, "linear lr warm-up from 0, per step", range="[0, inf)")
    weight_decay: float = _f(1e-4, "weight decay at step 0 on weights (not biases / norm layers)", range="[0, inf)")
    wd_end_factor: float = _f(1.0, "final wd = wd x this, cosine (ViT: 10, 0.04 -> 0.4)", range="[0, inf)")
    clip_grad: float = _f(0.0, "max global grad norm; 0 = off (official)", range="[0, inf)")
    schedule_offset: int = _f(1, "OFFICIAL 1: step t takes the lr and weight decay of t + 1 (engine/optimizer.py "
                                 "counts before stepping: the first lr is not 0); 0: from t = 0", choices=(0, 1))
    # --- data / system ---
    dataset: str = _f("imagefolder", "training set", choices=common.DATASETS)
    data_dir: str = _f(None, "dataset root (imagefolder: the folder holding train/)")
    download: bool = _f(False, "download torchvision datasets if missing")
    image_size: int = _f(224, "global crop size in pixels (also the backbone's resolution)", range="[1, inf)")
    train_subset: int = _f(0, "class-stratified subset of the train split; 0 = all", range="[0, inf)")
    backbone: str = _f("resnet50", "encoder f", choices=common.BACKBONES)
    zero_init_residual: bool = _f(True, "zero-init the last BN of each residual block (official R50: yes)")
    drop_path: float = _f(0.0, "ViT stochastic depth rate of the STUDENT's last block (block i: i/11 x this; "
                          "teacher 0); official ViT-S/16: 0.1", range="[0, 1]")
    workers: int = _f(8, "data-loading workers per rank", range="[0, inf)")
    data_path: str = _f("auto", "device: images on the device, views made there in batches; loader: DataLoader "
                        "workers; auto: device if the set fits (common.py)", choices=("auto", "device", "loader"))
    seed: int = _f(0, "random seed")
    output_dir: str = _f("runs/excb", "run directory: log.jsonl and ckpt_epoch*.pt")
    save_every: int = _f(20, "checkpoint every N epochs (plus the last)", range="[1, inf)")
    save_epoch0: bool = _f(False, "also checkpoint the k-means-initialised network before training (epoch 0)")
    resume: str = _f("", "PATH: continue from that checkpoint (strict: student, teacher, optimizer, s, step); "
                         "auto: the newest in --output-dir, or start fresh (resubmittable after a preemption)")
    skip_bad_images: bool = _f(False, "skip unreadable image files (counted as data/skipped_images) instead of "
                                      "stopping")
    precision: str = _f("auto", "auto = bf16 on GPUs with native bf16, fp16 + GradScaler on older GPUs "
                                "(official: fp16), fp32 on CPU", choices=common.PRECISIONS)
    compile: bool = _f(False, "torch.compile the student and the teacher")
    log_every: int = _f(50, "log every N steps", range="[1, inf)")


PRESETS = {
    # Official configs/resnet50_ep400.yaml + README: ResNet-50, 400 epochs, total batch 1024, SGD lr 0.6,
    # 2x224 + 6x96 crops, K = 65,536 -> 76.6 linear / 71.6 k-NN (paper Table 1: 76.5 / 71.0).
    "imagenet": dict(dataset="imagefolder", image_size=224, backbone="resnet50", epochs=400, batch_size=1024,
                     lr=0.6, warmup_epochs=10, weight_decay=1e-4, num_clusters=65536, n_local=6,
                     local_size=96, zero_init_residual=True),
    # Official configs/vit_s16_ep800.yaml over main_config.yaml + README: ViT-S/16 (DINO layout, common.ViT),
    # 800 epochs, total batch 1024, AdamW 0.002 absolute, wd 0.04 -> 0.4, heads without BN and with GELU
    # (mlp_bn False), 2x224 + 6x96 crops, drop-path 0.1 on the student (teacher 0), K = 65,536 -> 77.2 linear.
    "imagenet_vits": dict(dataset="imagefolder", image_size=224, backbone="vit_small", epochs=800,
                          batch_size=1024, optimizer="adamw", lr=0.002, warmup_epochs=10, weight_decay=0.04,
                          wd_end_factor=10.0, head_style="vit", num_clusters=65536, n_local=6, local_size=96,
                          drop_path=0.1),
    # OUR PORT (no official CIFAR config exists): ResNet-18 with the CIFAR stem, batch 256, lr by the paper's
    # rule 0.15 x batch / 256, K = 2048 (~24 images per cluster as on ImageNet), 6 local crops of 16 px,
    # no blur at 32 px (a 9x9 kernel wipes the image out), k-means on the whole train set.
    "cifar10": dict(dataset="cifar10", image_size=32, backbone="resnet18", epochs=500, batch_size=256,
                    lr=0.15, warmup_epochs=10, weight_decay=1e-4, num_clusters=2048, n_local=6, local_size=16,
                    blur_p=(0.0, 0.0, 0.0), kmeans_samples=50_000, zero_init_residual=False, save_every=50),
    # Ours: CPU demo of 1-2 minutes (scikit-learn digits at 16 px, tiny convnet, small heads, K = 64). A
    # 110-step run needs short EMA windows: teacher m from 0.95 and m_s = 0.99 (~100 steps) instead of
    # 0.996 / 0.999, which would leave the teacher and s at their initial values.
    "digits": dict(dataset="digits", image_size=16, backbone="convnet", epochs=5, batch_size=64, lr=0.15,
                   warmup_epochs=1, weight_decay=1e-4, num_clusters=64, n_local=2, local_size=8,
                   proj_hidden=256, proj_dim=64, ema_base=0.95, size_momentum=0.99, blur_p=(0.0, 0.0, 0.0),
                   kmeans_samples=2000, workers=0, zero_init_residual=False, save_every=5, log_every=10),
}
PRESETS["cifar100"] = dict(PRESETS["cifar10"], dataset="cifar100")  # our CIFAR port, on CIFAR-100


# ===================================== METHOD: ExCB, paper Sec. 3 =========================================
# Symbols (per rank and step):
#   B local batch; G = 2 global views; L local views; V = G + L; K clusters; D = proj_dim (256)
#   z_t  (G, B, K)  teacher cosine similarities to its centroids, Eq. (3)
#   s    (K,)       relative cluster sizes (proportions, sum 1; uniform 1/K at start), Eq. (8)-(9)
#   z_b  (G, B, K)  balanced similarities B(z_t; s), Eq. (4), (10)
#   p_t  (G, B, K)  teacher assignments softmax(z_b / tau_t), Eq. (6)
#   z_h  (G, B, K)  student projector path (the only path into the centroids), Eq. (2) left
#   z_g  (V, B, K)  student predictor path (centroids detached), Eq. (2) right
# Order of one step (OFFICIAL): balance with s up to step t-1 -> loss -> update s with step t's assignments.


class CentroidLayer(nn.Module):
    """q: Eq. (1) / Alg. 2. K centroids as rows of `weight` (K, D); forward(x (N, D)) -> cosines (N, K).

    OFFICIAL: architectures/layers.py uses weight_norm with the gain frozen at 1, i.e. unit rows v / |v| with
    the direction v learned (weight decay acts on v). detach=True is the paper's q-bar: gradient still reaches
    x, never the centroids. Computed in float32: bf16's 8-bit mantissa would blur cosines by ~4e-3, i.e. 0.1
    in the teacher's logits after dividing by tau_t = 0.04."""

    def __init__(self, dim, num_clusters):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_clusters, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default; k-means overwrites it

    def forward(self, x, detach=False):
        C = self.weight.detach() if detach else self.weight
        with torch.autocast(x.device.type, enabled=False):
            return F.normalize(x.float(), dim=-1) @ F.normalize(C.float(), dim=-1).T  # Eq. (1), (N, K)


def build_heads(in_dim, hidden=2048, dim=256, style="resnet"):
    """h (projector) and g (predictor), Sec. 4.1: "h is a 2-layer MLP with hidden 2048 and output 256, g a
    1-layer MLP with the same sizes". OFFICIAL (engine/model.py): 2 hidden layers = 3 Linear, no output BN;
    g starts with a BatchNorm1d on h's raw output; Linears trunc-normal(0.02), bias 0. Plain torch.nn layers
    so the checkpoint can store h as a head."""
    bn = nn.BatchNorm1d if style == "resnet" else (lambda n: nn.Identity())  # ViT config: mlp_bn False, GELU
    act = nn.ReLU if style == "resnet" else nn.GELU
    projector = nn.Sequential(nn.Linear(in_dim, hidden), bn(hidden), act(),
                              nn.Linear(hidden, hidden), bn(hidden), act(), nn.Linear(hidden, dim))
    predictor = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, hidden), bn(hidden), act(),
                              nn.Linear(hidden, dim))
    for m in [*projector, *predictor]:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return projector, predictor


class ExCBNet(nn.Module):
    """f, h, g, q of Sec. 3.1. forward(x_global (G*B, ...), x_local (L*B, ...) or None) -> (z_h, z_g).

    OFFICIAL (engine/model.py): views are batched by resolution through f, and h runs once on all V*B
    features, so h's BatchNorm sees global and local crops together. The local crops' projector similarities
    of Alg. 1 are never used by the official loss, so they are not computed. The teacher is a copy with
    predictor = None: it returns (z_t, None), Eq. (3)."""

    def __init__(self, backbone, feat_dim, num_clusters, hidden=2048, dim=256, style="resnet"):
        super().__init__()
        self.backbone = backbone
        self.projector, self.predictor = build_heads(feat_dim, hidden, dim, style)
        self.centroids = CentroidLayer(dim, num_clusters)

    def forward(self, x_global, x_local=None):
        f = self.backbone(x_global)
        if x_local is not None:
            f = torch.cat([f, self.backbone(x_local)])
        u = self.projector(f)                                     # (V*B, D)
        z_h = self.centroids(u[: len(x_global)])                  # Eq. (2) left, Eq. (3) for the teacher
        if self.predictor is None:
            return z_h, None
        return z_h, self.centroids(self.predictor(u), detach=True)  # Eq. (2) right: q-bar(g(h(f(x))))


def boost_top(z_b, factor=1.01):
    """OFFICIAL (engine/criterion.py), not in the paper: each row's top balanced similarity x1.01, then clamp
    to [-1, 1]. It sharpens the teacher target a little; the released models were trained with it."""
    top = z_b.argmax(-1, keepdim=True)
    return z_b.scatter(-1, top, z_b.gather(-1, top) * factor).clamp(-1, 1)


@torch.no_grad()
def teacher_targets(z_t, s, tau_t=0.04, boost=True):
    """z_t (G, B, K) -> (p_t, z_b): the balanced similarities and the teacher's soft assignments."""
    z_b = balance(z_t.float(), s)                   # Eq. (4)
    z_b = boost_top(z_b) if boost else z_b
    return F.softmax(z_b / tau_t, dim=-1), z_b      # Eq. (6)


def excb_loss(p_t, z_h, z_g, tau_s=0.1):
    """Eq. (7), OFFICIAL pairing (engine/trainer.py unroll_batch): p_t (2, B, K) no grad, z_h (2, B, K),
    z_g (V, B, K) -> scalar.

    Teacher view t is matched to the student's projector path of the OTHER global view (1 pair) and to the
    predictor path of EVERY view, its own included (V pairs): 2 (1 + V) pairs = 18 with 2 + 6 crops, 6 without
    multi-crop, plain average of per-pair batch means. OFFICIAL over Eq. (7) / Alg. 1, which also match
    local projector paths and weight the two sums 1/2 each."""
    B = p_t.shape[1]
    log_h = F.log_softmax(z_h / tau_s, dim=-1)                         # Eq. (5), p_s^h
    log_g = F.log_softmax(z_g / tau_s, dim=-1)                         # Eq. (5), p_s^g
    ce_h = -(p_t * log_h.flip(0)).sum(-1).mean(-1)                     # (2,): H(p_t(x'), p_s^h(x'')), x'' != x'
    ce_g = -torch.einsum("tbk,vbk->tv", p_t, log_g) / B                # (2, V): H(p_t(x'), p_s^g(x''))
    return (ce_h.sum() + ce_g.sum()) / (ce_h.numel() + ce_g.numel())   # Eq. (7)


@torch.no_grad()
def update_cluster_sizes(s, z_b, momentum=0.999):
    """Eq. (8)-(9): s (K,), z_b (..., K) BALANCED teacher similarities of both global views -> new s.

    OFFICIAL: the hard assignments are the argmax of the balanced (and boosted) teacher output (= argmax of
    p_t, Eq. (8)); called after the loss, so step t is balanced with sizes up to t-1. The batch proportions
    are averaged over ranks (every rank holds the same number of images), so s is a global estimate."""
    s_B = torch.bincount(z_b.argmax(-1).flatten(), minlength=len(s)).float()  # (K,) hard-assignment counts
    s_B = common.all_reduce_mean(s_B / s_B.sum())   # Eq. (8), proportions of the global batch
    return momentum * s + (1 - momentum) * s_B        # Eq. (9)


def balance(z, s):
    """B(z; s), Eq. (10), Sec. 3.2 (teacher_targets, Eq. (4)): z (..., K) cosines, s (K,) relative sizes -> z_b.

    r = sK is a cluster's size relative to the balanced 1/K: r < 1 pulls z toward 1 (r = 0 gives exactly 1),
    r > 1 pushes z toward -1 (r = K, one cluster holding everything, gives (1+z)/K - 1), r = 1 leaves z.
    Output stays in [-1, 1] and is decreasing in s."""
    K = s.shape[-1]
    r = s * (K / s.sum())  # OFFICIAL: criterion.py re-normalises s to sum 1 (guards the EMA's float drift)
    # DEVIATION: the official code adds U(0, 1e-3) noise to a weight that is exactly 0 (s underflows to 0 for a
    # cluster unused for ~1e5 steps); Eq. (10) defines that endpoint as exactly 1, which we keep.
    low = 1 - (1 - z) * r                          # Eq. (10), s < 1/K
    high = (1 + z) / r.clamp(min=1) - 1            # Eq. (10), s > 1/K (the clamp only avoids 1/0 where unused)
    return torch.where(r < 1, low, torch.where(r > 1, high, z))


@torch.no_grad()
def ema_update(teacher, student, m):
    """Sec. 3.1: theta_t <- m theta_t + (1 - m) theta_s over the teacher's parameters (centroids included; the
    teacher has no predictor). BN running statistics are not averaged: the teacher runs in train mode."""
    student_params = dict(student.named_parameters())
    t_params = [p for _, p in teacher.named_parameters()]
    torch._foreach_lerp_(t_params, [student_params[n] for n, _ in teacher.named_parameters()], 1.0 - m)


# --- training statistics of Fig. 4 (diagnostics, never in the loss; labels only ever reach these) ---
def teacher_confidence(p_t):
    """c_avg, Eq. (11): mean over images and global views of the teacher's top probability."""
    return p_t.amax(-1).mean()


def view_agreement(z_b):
    """a_avg, Eq. (12): fraction of ordered global-view pairs whose teacher argmax agree (G = 2)."""
    return (z_b[0].argmax(-1) == z_b[1].argmax(-1)).float().mean()


def count_assignments(counts, z_b, y):
    """Adds the step's teacher hard assignments (G, B) to the epoch's (K, C) cluster x label counts."""
    C = counts.shape[1]
    y = y.clamp(min=0, max=C - 1).expand(z_b.shape[0], -1)   # datasets without labels use C = 1, y = 0
    counts.view(-1).index_add_(0, (z_b.argmax(-1) * C + y).flatten(), torch.ones(y.numel(), device=y.device))


def cluster_stats(counts):
    """Fig. 4(c), (e) from the epoch's all-reduced (K, C) counts: min / max relative size (size x K / N; 1 is
    balanced), empty clusters, and purity (Zhao & Karypis: sum over clusters of the majority label / N)."""
    n_k = counts.sum(1)
    rel = n_k * len(n_k) / n_k.sum()
    return {"excb/size_min": rel.min(), "excb/size_max": rel.max(), "excb/empty_clusters": (n_k == 0).sum(),
            "excb/purity": counts.amax(1).sum() / n_k.sum()}


# ===================================== VIEWS: official data/transforms.py =================================
def global_min_scale(epoch, epochs, start=0.26, end=0.14):
    """m(e): OFFICIAL per-epoch cosine of the global crops' lower scale (0.26 -> 0.14); the local crops take
    (local_min_scale, m(e)), so the two ranges stay complementary. The paper states fixed ranges
    ([0.14, 1] without multi-crop, [0.2, 1] / [0.05, 0.2] with it)."""
    return common.cosine_schedule(epoch, epochs, start, end)


def build_views(args, info):
    """2 global crops at --image-size + L local crops at --local-size -> [g1, g2, l1, ..., lL].

    OFFICIAL: bicubic crops, flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, blur (9x9
    kernel, sigma in [0.1, 2]), solarize only on global view 2. The official GaussianBlur inverts its
    probability, so the blur it applies is 0 / 0.9 / 0 (global 1 / global 2 / local), our default."""
    def view(size, blur_p, solarize_p):
        return common.Augment(size, scale=(args.global_min_scale[0], 1.0), interpolation="bicubic",
                              jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=blur_p,
                              blur_kernel=9, solarize_p=solarize_p, mean=info.mean, std=info.std)
    g = [view(args.image_size, args.blur_p[i], args.solarize_p[i]) for i in (0, 1)]  # global views 1, 2
    local = view(args.local_size, args.blur_p[2], 0.0) if args.n_local else None
    schedule = functools.partial(global_min_scale, epochs=args.epochs, start=args.global_min_scale[0],
                                 end=args.global_min_scale[1])
    return common.MultiCrop(g, local, args.n_local, schedule, args.local_min_scale)


# ===================================== CENTROID INIT: official k-means (not in Sec. 3) ====================
@torch.no_grad()
def spherical_kmeans(x, K, iters=50, tries=10, seed=0, chunk=8192):
    """Centroid init (OFFICIAL: trainer.init_centroids, utils/misc.distributed_kmeans; Sec. 4.1 does not
    describe it): x (N_local, D) unit rows on this rank -> (means (K, D), unit centroids (K, D)).

    K random samples start it (ceil(K/W) per rank), then arg-max-cosine assignment and the all-reduced mean,
    renormalised. The whole run is repeated until no cluster is empty; an impossible K fails clearly."""
    W, n_local = common.get_world_size(), len(x)
    n_total = int(common.all_reduce_sum(torch.tensor([float(n_local)], device=x.device)).item())
    per_rank = math.ceil(K / W)
    if K >= n_total or per_rank > n_local:
        raise common.UsageError(f"k-means init: K={K} clusters cannot all be non-empty with {n_total} samples "
                         f"({n_local} on this rank); use --num-clusters well below the sample count "
                         f"(or raise --kmeans-samples / --train-subset)")
    gen = torch.Generator().manual_seed(seed * 1000 + common.get_rank())
    for attempt in range(tries):
        C = common.all_gather_nograd(x[torch.randperm(n_local, generator=gen)[:per_rank].to(x.device)])[:K]
        for _ in range(iters):
            assign = torch.cat([(xc @ C.T).argmax(1) for xc in x.split(chunk)])       # (N_local,)
            sums = common.all_reduce_sum(torch.zeros_like(C).index_add_(0, assign, x))  # (K, D)
            counts = common.all_reduce_sum(torch.zeros(K, device=x.device).index_add_(
                0, assign, torch.ones(n_local, device=x.device)))                      # (K,)
            C = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), C)          # empty: keep old
        empty = int((counts == 0).sum().item())
        if empty == 0:  # OFFICIAL: the student gets the raw means, the teacher the unit centroids
            return sums / counts[:, None], C
        common.print0(f"k-means attempt {attempt + 1}/{tries}: {empty} of {K} clusters empty, restarting")
    raise RuntimeError(f"k-means init left {empty} of K={K} clusters empty after {tries} attempts; "
                       f"lower --num-clusters or raise --kmeans-samples (have {n_total} samples)")


@torch.no_grad()
def init_centroids(student, teacher, loader, args, device, prec):
    """k-means init (OFFICIAL trainer.init_centroids): the RANDOM teacher's L2-normalised projections of up
    to --kmeans-samples images, one global view per batch (alternating by batch parity)."""
    want, feats = math.ceil(args.kmeans_samples / common.get_world_size()), []
    loader.set_epoch(0)
    for i, (views, _) in enumerate(loader):
        with prec.autocast():
            u = teacher.projector(teacher.backbone(stack_views(views[i % 2:i % 2 + 1], device)))
        feats.append(F.normalize(u.float(), dim=1))
        if sum(map(len, feats)) >= want:
            break
    x = torch.cat(feats)[:want]
    means, C = spherical_kmeans(x, args.num_clusters, args.kmeans_iters, args.kmeans_tries, args.seed)
    student.centroids.weight.copy_(means)
    teacher.centroids.weight.copy_(C)
    common.print0(f"k-means init: K={args.num_clusters} centroids from {len(x)} teacher projections per rank")


# ===================================== TRAINING LOOP: plumbing ============================================
def param_groups(student):
    """OFFICIAL engine/optimizer.py: weight decay on conv/linear weights, none on biases and norm layers
    (1-D parameters), and the centroids in their own group with the scheduled decay (Sec. 4.1)."""
    centroids = student.centroids.weight
    rest = [p for p in student.parameters() if p is not centroids]
    return [{"name": "decay", "params": [p for p in rest if p.ndim > 1]},
            {"name": "no_decay", "params": [p for p in rest if p.ndim <= 1]},
            {"name": "centroids", "params": [centroids]}]


def schedules(step, total, warmup, args):
    """Pure functions of the global step (resume needs no scheduler state). OFFICIAL: lr warm-up from 0 then
    cosine to lr x 1e-4; wd cosine to wd x wd_end_factor; centroid wd x (1 + 9 c(t)), c: 1 -> 0 (Sec. 4.1:
    1e-3 -> 1e-4 for ResNet-50); teacher EMA 0.996 -> 1 (Sec. 4.1). --schedule-offset 1 (official): lr and
    weight decay of step t are the values at t + 1, so the first lr is lr / warm-up steps; the EMA takes t."""
    t = step + args.schedule_offset  # OFFICIAL: engine/optimizer.py steps its counter first (lr at 0 is not 0)
    lr = common.cosine_schedule(t, total, args.lr, args.lr * args.final_lr_ratio, warmup)
    wd = common.cosine_schedule(t, total, args.weight_decay, args.weight_decay * args.wd_end_factor)
    wd_centroids = wd * common.cosine_schedule(t, total, args.centroid_wd_factor, 1.0)
    m = common.cosine_schedule(step, total, args.ema_base, 1.0)
    return {"lr": lr, "decay": wd, "no_decay": 0.0, "centroids": wd_centroids, "ema": m}


def stack_views(views, device):
    """Same-resolution views -> one (V*B, 3, H, W) batch on the device (None for no views). Each view is copied
    on its own, then concatenated ON the device: a host-side torch.cat would build an unpinned tensor whose copy
    blocks, a single-threaded host copy of ~480 MB per step with the ImageNet preset on 4 GPUs."""
    if not views:
        return None
    x = torch.cat([v.to(device, non_blocking=True) for v in views])
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def main(argv=None):
    args = common.parse_args(Args, PRESETS, argv)
    dist = common.setup_distributed()
    common.check_writable(args.output_dir)  # a bad --output-dir fails now, in one line, not after an epoch
    device = dist.device
    common.seed_everything(args.seed)  # same init on every rank: the teacher is not broadcast by DDP
    B = common.split_batch(args.batch_size, dist.world_size)
    # DEVIATION: --precision auto is bf16 on GPUs that have it (official: fp16 + GradScaler = --precision fp16);
    # the centroid cosines, balancing and loss run in float32 in every mode
    prec = common.MixedPrecision(args.precision, device)
    K, G, L = args.num_clusters, 2, args.n_local
    common.print0(f"ExCB: global batch {args.batch_size} = {dist.world_size} ranks x {B}; K={K}; "
                  f"views 2x{args.image_size}" + (f" + {L}x{args.local_size}" if L else "")
                  + f"; device {device}, precision {prec.name}")

    # --- data: labels only feed the purity diagnostic ---
    info = common.dataset_info(args.dataset, args.image_size)
    train = common.build_dataset(args.dataset, "train", build_views(args, info), args.data_dir, args.download,
                                 args.train_subset, args.seed, image_size=args.image_size,
                                 skip_bad=args.skip_bad_images)
    info = dataclasses.replace(info, num_classes=train.num_classes)
    has_labels = bool((train.targets >= 0).all())
    loader = common.build_train_loader(train, B, dist, args.data_path, args.workers, seed=args.seed)
    steps_per_epoch = len(loader)
    total, warmup = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)

    # --- student, teacher (EMA copy without predictor), cluster sizes s ---
    backbone, feat_dim = common.build_backbone(args.backbone, args.image_size, drop_path=args.drop_path,
                                               zero_init_residual=args.zero_init_residual)
    if L and args.local_size % getattr(backbone, "patch_size", 1):  # the ViT takes multiples of its patch
        raise common.UsageError(f"--local-size {args.local_size} is not a multiple of the ViT patch size "
                                f"{backbone.patch_size}")
    student = ExCBNet(backbone, feat_dim, K, args.proj_hidden, args.proj_dim, args.head_style).to(
        device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    teacher = common.disable_drop_path(copy.deepcopy(student)).requires_grad_(False)  # OFFICIAL: ViT drop-path 0
    teacher.predictor = None
    s = torch.full((K,), 1.0 / K, device=device)  # Eq. (9): uniform at the start, so step 0 is unbalanced
    model = common.ddp_wrap(student, dist)  # SyncBN (CUDA) keeps student's Parameter objects and state keys

    # --- optimizer: weights / biases + norm layers / centroids, each group with its scheduled decay ---
    optimizer = (torch.optim.SGD(param_groups(student), lr=0.0, momentum=0.9) if args.optimizer == "sgd"
                 else torch.optim.AdamW(param_groups(student), lr=0.0, betas=(0.9, 0.999)))

    # --- resume (strict; --resume PATH | auto) or k-means init ---
    step, epoch_sums = 0, None
    ckpt = common.resume_checkpoint(args, "excb")
    if ckpt is not None:
        state = common.load_train_state(ckpt, args, student=student, teacher=teacher, optimizer=optimizer,
                                        scaler=prec)  # strict: every tensor must fit
        s, step = state["s"].to(device), ckpt["step"]
        epoch_sums = state.get("epoch_sums")  # a run stopped mid-epoch: its partial Fig. 4 statistics
        common.print0(f"resumed at epoch {step // steps_per_epoch}, step {step}")
    elif args.kmeans_init:
        init_centroids(student, teacher, loader, args, device, prec)
    else:  # random centroids, identical in student and teacher
        teacher.centroids.weight.copy_(student.centroids.weight)
    if dist.distributed and device.type == "cuda":
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)  # OFFICIAL: SyncBN teacher
    model, teacher_fwd = (torch.compile(model), torch.compile(teacher)) if args.compile else (model, teacher)

    logger = common.RunLogger(args.output_dir, dist, total, start_step=step)
    logger.write_config({"config": dataclasses.asdict(args), "precision": prec.name, "start_step": step})
    lr_at = lambda t: schedules(t, total, warmup, args)["lr"]  # noqa: E731 (the guard's expected lr)
    guard = common.DivergenceGuard(device, steps_per_epoch, total, lr_at, args.output_dir)
    stop = common.StopSignal(dist)

    def save(epoch, mid_epoch=False, epoch_sums=None):  # every rank calls it (the guard's check is collective)
        """Rank 0 writes common.py's format; the TEACHER backbone is the evaluation encoder (OFFICIAL linear
        eval). epoch_sums: the epoch's Fig. 4 accumulators so far, kept by a checkpoint written inside an epoch.
        The teacher projector is stored as it is: a SyncBatchNorm is stored as the BatchNorm1d it evaluates as."""
        guard.check()  # never a checkpoint of a diverged state
        if not dist.is_main:
            return
        heads = {"projector": teacher.projector, "normalize_output": True,
                 "centroids": F.normalize(teacher.centroids.weight.detach().float(), dim=1)}
        train_state = {"student": student.state_dict(), "teacher": teacher.state_dict(),
                       "optimizer": optimizer.state_dict(), "s": s.detach().cpu(), "scaler": prec.state_dict(),
                       **({"epoch_sums": epoch_sums} if epoch_sums is not None else {})}
        spec = common.backbone_spec(args.backbone, args.image_size, zero_init_residual=args.zero_init_residual)
        ckpt = common.make_checkpoint("excb", epoch, step, args, spec, teacher.backbone, "teacher", info,
                                      train_state, heads=heads, precision=prec.name)
        common.save_checkpoint(Path(args.output_dir) / common.checkpoint_name(epoch, step if mid_epoch else None),
                               ckpt)
        common.prune_interrupted(args.output_dir, step)

    if step == 0 and args.save_epoch0:
        save(0)
    for epoch in range(step // steps_per_epoch, args.epochs):
        loader.set_epoch(epoch, start_batch=step - epoch * steps_per_epoch)  # > 0 only after a mid-epoch stop
        counts = torch.zeros(K, train.num_classes if has_labels else 1, device=device)  # Fig. 4(c), (e)
        sums = torch.zeros(4, device=device)  # loss, c_avg, a_avg, steps: epoch means without a sync
        if epoch_sums is not None and dist.is_main:  # the epoch's statistics so far (all ranks), from the
            counts, sums = epoch_sums["counts"].to(device), epoch_sums["sums"].to(device)  # mid-epoch checkpoint
        epoch_sums = None
        model.train()
        teacher.train()  # OFFICIAL: the teacher uses batch statistics too
        for views, y in logger.timed(loader):
            common.seed_step(args.seed, step, dist.rank)
            sched = schedules(step, total, warmup, args)  # pure functions of the global step
            for group in optimizer.param_groups:
                group["lr"], group["weight_decay"] = sched["lr"], sched[group["name"]]
            x_g, x_l = stack_views(views[:G], device), stack_views(views[G:], device)  # (G*B, ...), (L*B, ...)
            with prec.autocast():  # the centroid cosines (Eq. 1) switch autocast off: float32
                with torch.no_grad():
                    z_t = teacher_fwd(x_g)[0].view(G, B, K)           # Eq. (3)
                z_h, z_g = model(x_g, x_l)                            # Eq. (2)
            p_t, z_b = teacher_targets(z_t, s, args.tau_t, args.boost_top)  # Eq. (4), (6), (10)
            loss = excb_loss(p_t, z_h.view(G, B, K), z_g.view(G + L, B, K), args.tau_s)  # Eq. (7)
            optimizer.zero_grad(set_to_none=True)
            prec.scaler.scale(loss).backward()  # the scaler is a no-op outside fp16
            if args.clip_grad > 0:
                prec.scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
                nn.utils.clip_grad_norm_(student.parameters(), args.clip_grad)
            prec.scaler.step(optimizer)
            prec.scaler.update()
            ema_update(teacher, student, sched["ema"])             # Sec. 3.1
            s = update_cluster_sizes(s, z_b, args.size_momentum)   # Eq. (8)-(9), after the loss: step t+1 sees it
            with torch.no_grad():
                c_avg, a_avg = teacher_confidence(p_t), view_agreement(z_b)
                count_assignments(counts, z_b, y.to(device, non_blocking=True))
                sums += torch.stack([loss.detach(), c_avg, a_avg, torch.ones((), device=device)])
            step += 1
            guard.update(loss, step)
            if step % args.log_every == 0 or step == total:
                guard.check()
                logger.step_line(epoch, step, common.all_reduce_mean(loss.detach()), sched["lr"], args.batch_size,
                                 extra={"sched/ema": sched["ema"], "sched/wd_centroids": sched["centroids"],
                                        "excb/c_avg": c_avg, "excb/a_avg": a_avg, "excb/s_min": s.min() * K,
                                        "excb/s_max": s.max() * K, "data/skipped_images": loader.skipped_images})
            if stop():  # SIGTERM / SIGUSR1 (preemption): every rank leaves after this same step
                break
        if done := step == (epoch + 1) * steps_per_epoch:  # the epoch ran to its end: Fig. 4, over all ranks
            loss_m, c_m, a_m, n = (common.all_reduce_sum(sums) / dist.world_size).tolist()
            stats = {k: v for k, v in cluster_stats(common.all_reduce_sum(counts)).items()
                     if has_labels or k != "excb/purity"}
            logger.log({"epoch": epoch + 1, "step": step, "epoch/loss": loss_m / n, "excb/c_avg_epoch": c_m / n,
                        "excb/a_avg_epoch": a_m / n, "sched/global_min_scale": global_min_scale(
                            epoch, args.epochs, *args.global_min_scale), **stats})
            common.print0(f"epoch {epoch + 1}/{args.epochs} loss {loss_m / n:.4f} c_avg {c_m / n:.3f} "
                          f"a_avg {a_m / n:.3f} size min/max {stats['excb/size_min']:.2f}/"
                          f"{stats['excb/size_max']:.2f} empty {int(stats['excb/empty_clusters'])}"
                          + (f" purity {stats['excb/purity']:.3f}" if has_labels else ""))
        # the one exit path: at the epoch's end a checkpoint if due; on a stop signal a mid-epoch one (unless
        # just written) with the epoch's statistics so far, summed over ranks; then leave
        due = done and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs)
        if due or stop.stopping:
            partial = None if done else {"counts": common.all_reduce_sum(counts).cpu(),
                                         "sums": common.all_reduce_sum(sums).cpu()}
            save(epoch + 1 if due else step // steps_per_epoch, mid_epoch=not due, epoch_sums=partial)
        if stop.stopping:
            common.print0(f"stopped by a signal after step {step}; rerun the same command with --resume auto")
            break
    stop.close()
    common.cleanup_distributed()


# ===================================== THE PAPER'S MEASUREMENTS: App. A (Fig. 5) and App. C (Fig. 7) ==========
# Appendix A: every train image is assigned to its most similar centroid by plain inference (the cosine of its
# projector output with the centroids, no balancing operator), at every checkpoint; Fig. 5 sorts the clusters by
# relative size N_c K / N (1 = the balanced size). Appendix C, Fig. 7: t-SNE of the projector features
# (h o f)(x) of a few classes, last checkpoint. The outputs keep the names monitor.py gave them before.
def cluster_size_summary(counts):
    """Images per cluster (K,) -> relative sizes N_c K / N, descending, and their summary (an excb.csv row)."""
    k, n = len(counts), int(counts.sum())
    rel = (counts.double() * k / n).sort(descending=True).values
    empty = int((counts == 0).sum())
    return rel, {"K": k, "N": n, "empty": empty, "empty_frac": empty / k, "max_rel_size": float(rel[0]),
                 "median_rel_size": float(rel.median()), "q10_rel_size": float(rel.quantile(0.1)),
                 "q90_rel_size": float(rel.quantile(0.9))}


def analyze(argv):
    """`python excb.py analyze RUN_DIR`: cluster sizes by inference at every checkpoint (App. A, Fig. 5) and a
    t-SNE of the last one (App. C, Fig. 7) -> excb.csv, monitor_excb_sizes.png, monitor_excb_tsne.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    p = common.ArgParser(prog="excb.py analyze", description=analyze.__doc__)  # usage errors: one line, exit 2
    p.add_argument("run", help="run directory (every *.pt, in epoch order) or one checkpoint")
    p.add_argument("--out-dir", default="", help="where the outputs go (default: the run directory)")
    p.add_argument("--bn", choices=("eval", "batch"), default="eval", help="BatchNorm statistics")
    p.add_argument("--data-dir", default=None, help="override the data directory stored in the checkpoints")
    for flag, low, default, text in (  # t-SNE: more points than its perplexity (>= 2), so >= 3 images
            ("--samples", 0, 0, "train images assigned (0 = all, as the paper)"), ("--batch-size", 1, 256, ""),
            ("--tsne-classes", 1, 10, "classes in the t-SNE picture (Fig. 7)"), ("--workers", 0, 0, ""),
            ("--tsne-per-class", 3, 100, "images per t-SNE class"), ("--seed", 0, 0, "seed of the t-SNE"),
            ("--threads", 0, 1, "CPU threads (0 = the defaults)")):
        p.add_argument(flag, type=common.ranged(int, f"[{low}, inf)"), default=default, help=text)
    a = p.parse_args(argv)
    paths, run_name = common.list_checkpoints(a.run), common.run_dir_of(a.run).name  # the run first, then
    out = common.check_writable(a.out_dir or common.run_dir_of(a.run))  # a read-only output: one line, no work
    device, rows, sizes, loader = common.select_device(), [], {}, None
    progress = common.Progress("excb.py analyze", len(paths), "checkpoints")
    with common.cpu_threads(a.threads), torch.no_grad():
        for path in paths:
            ckpt = common.load_checkpoint(path)
            (backbone, meta), heads = common.load_backbone(ckpt), common.load_heads(ckpt)
            if not {"projector", "centroids"} <= set(heads):
                raise common.UsageError(f"{path} has heads {sorted(heads)}; excb.py analyze needs 'projector' "
                                        "and 'centroids' (an ExCB checkpoint)")
            if 0 < a.samples < max(3, meta["data"]["num_classes"]):  # a class-stratified subset; t-SNE: >= 3
                p.error(f"argument --samples: {a.samples} is too few: one image per class and 3 for the t-SNE")
            loader = loader or common.eval_loader(meta, "train", a.data_dir, a.batch_size, a.workers, a.samples)
            net = nn.Sequential(backbone, heads["projector"]).to(device).train(a.bn == "batch")
            h, y = map(torch.cat, zip(*[(net(x.to(device)).float().cpu(), y) for x, y in loader]))  # (N, D)
            z = F.normalize(h, dim=1) @ F.normalize(heads["centroids"].float().cpu(), dim=1).T  # (N, K) cosines
            rel, summary = cluster_size_summary(torch.bincount(z.argmax(1), minlength=z.shape[1]))
            sizes[int(meta["epoch"])] = rel
            rows.append({"checkpoint": path.name, "epoch": int(meta["epoch"]), **summary})
            common.print0(f"{path.name}: " + " ".join(f"{k} {v:.4g}" for k, v in summary.items()))
            progress.update(1)
        common.write_csv(out / "excb.csv", rows, list(rows[0]))  # creates out
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (e, rel) in enumerate(sorted(sizes.items())):
            ax.plot(range(1, len(rel) + 1), rel, color=plt.get_cmap("viridis")(i / max(len(sizes) - 1, 1)),
                    lw=1.2, label=f"epoch {e}")
        s = rows[-1]
        if s["empty"]:  # shade the empty clusters of the last checkpoint
            ax.axvspan(s["K"] - s["empty"] + 0.5, s["K"] + 0.5, color="red", alpha=0.12, label="empty (last)")
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label="balanced size 1")
        ax.set_yscale("symlog", linthresh=1.0)  # linear in [0, 1] (under-used clusters), log above (over-used)
        ax.set(xlabel="cluster rank (sorted by size)", ylabel="relative size N_c K / N (1 = balanced, symlog)",
               ylim=(0, 1.5 * max(float(rel[0]) for rel in sizes.values())),
               title=f"run {run_name} ({meta['method']}): cluster sizes; epoch {s['epoch']}: K={s['K']}, "
                     f"N={s['N']}, {s['empty']} empty, largest {s['max_rel_size']:.1f}")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: covers no data
        fig.savefig(out / "monitor_excb_sizes.png", dpi=110, bbox_inches="tight")
        g = torch.Generator().manual_seed(a.seed)  # Fig. 7: tsne_per_class random images of the first classes
        pick = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)]
                          [:a.tsne_per_class] for c in torch.unique(y)[:a.tsne_classes]])
        xy = TSNE(2, perplexity=float(min(30.0, max(2.0, (len(pick) - 1) / 3))), init="pca",
                  random_state=a.seed).fit_transform(h[pick].numpy())
        fig, ax = plt.subplots(figsize=(6, 6))
        for c in torch.unique(y[pick]).tolist():  # one colour per class, named as the dataset names it
            m = (y[pick] == c).numpy()
            ax.scatter(xy[m, 0], xy[m, 1], s=6, label=str(getattr(loader.dataset, "classes", range(c + 1))[c]))
        ax.set(xticks=[], yticks=[], xlabel="t-SNE 1 (no unit)", ylabel="t-SNE 2 (no unit)",
               title=f"run {run_name} ({meta['method']}), epoch {s['epoch']}: t-SNE of projector features")
        ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.savefig(out / "monitor_excb_tsne.png", dpi=110, bbox_inches="tight")
    common.print0(f"wrote excb.csv, monitor_excb_sizes.png, monitor_excb_tsne.png to {out}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["analyze"]:
        common.run(lambda: analyze(sys.argv[2:]))
    else:
        common.run(main)
