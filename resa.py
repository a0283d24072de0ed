r"""ReSA: Representation Self-Assignment, one file.

Paper:   X. Weng, J. An, X. Ma, B. Qi, J. Luo, X. Yang, J. S. Dong, L. Huang,
         "Clustering Properties of Self-Supervised Learning", ICML 2025, arXiv 2501.18452.
Official code (Apache-2.0): github.com/winci-ai/resa (ImageNet, e7869d1: method/resa.py, method/base.py,
src/model.py, src/transform.py, src/utils.py, args.py) and github.com/winci-ai/resa_cifar (CIFAR, bc5d70a).

Idea: the ENCODER output H clusters better than the projector output Z, so H teaches Z. Sinkhorn-Knopp turns
the cosine self-similarity of the (online x momentum) weak-view encodings into a soft "who goes with whom"
assignment A (no gradient, no prototypes); a cross-entropy makes the softmax over cross-view embedding
similarities match A. We follow the FINAL official code (Mar/Apr 2025): A has local rows x global columns
and the same A serves both view orderings; the paper's two-sided Eq. (3) is behind --two-sided.

Read beside the paper's method section and its Appendix-B pseudo-code. Every line that implements the paper
carries a tag (`# Eq. (3)`, `# App. B`), `# OFFICIAL:` where we follow the code over the paper, and
`# DEVIATION:` where we differ, so `grep -n "Eq\.\|App\. B\|OFFICIAL\|DEVIATION" resa.py` prints the map.
Only Eq. (3)'s number could be checked (the full text was not available); other pieces cite App. B.

Commands (expected time / result):
  python resa.py --preset digits --output-dir runs/resa_digits    # CPU: 160 s on 2 busy cores, see Measured
  python probe.py runs/resa_digits                                # k-NN / linear / few-shot per checkpoint
  python resa.py --preset cifar10 --data-dir data --download --output-dir runs/resa_c10  # 1 GPU, 1000 ep
  torchrun --nproc_per_node=8 resa.py --preset imagenet --data-dir /data/imagenet --output-dir runs/in1k
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
      resa.py --preset imagenet_bs1024 --data-dir /data/imagenet --output-dir runs/in1k_1024
  --batch-size is GLOBAL: the same preset gives the same optimisation at any GPU count.

Measured (CPU, torch 2.14.1, 2 cores shared with other jobs, OMP_NUM_THREADS=1, seed 0, one run each;
momentum-encoder k-NN, DINO cosine k=20, at initialisation -> end; details in docs/resa.md):
  digits preset, 6 epochs: 159 s, 53-67 img/s; k-NN 94.4 -> 95.6 % (360 test images)
  CIFAR-10 JPEG, 5,000-image train subset, convnet 32 px, 3 epochs: 581 s, 24-29 img/s;
      k-NN 30.3 -> 33.4 % (10,000 test images; 5-NN Euclidean 27.7 -> 29.5 %)
  cifar10 / imagenet presets on GPUs: unmeasured (no GPU in this session)
"""
import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


def _f(default, help, **check):
    """A flag: its default, its help, and its checks (choices=(...), range="[1, inf)"; common.parse_args)."""
    return field(default=default, metadata={"help": help, **check})


@dataclass
class Args:
    # --- method (App. B; the paper says these need no tuning) ---
    temperature: float = _f(0.4, "tau, softmax temperature of the embedding similarities in the loss",
                            range="(0, inf)")
    sk_eps: float = _f(0.05, "epsilon, Sinkhorn-Knopp entropic temperature on the encoder cosine similarities",
                       range="(0, inf)")
    sk_iters: int = _f(3, "Sinkhorn-Knopp iterations", range="[1, inf)")
    ema_base: float = _f(0.996, "momentum-encoder EMA coefficient at step 0; cosine to 1 at the end, per step",
                         range="[0, 1]")
    two_sided: bool = _f(False, "paper Eq. (3): add the column cross-entropy (A^T); default = final official code")
    proj_hidden: int = _f(2048, "projector hidden width", range="[1, inf)")
    emb_dim: int = _f(512, "embedding dimension (projector output)", range="[1, inf)")
    predictor: bool = _f(False, "online-only predictor MLP (official ImageNet code: on; CIFAR code: none)")
    head_style: str = _f("resnet", "resnet: Linear-BN-ReLU heads; vit: GELU heads without BN (deleted ViT code)",
                         choices=("resnet", "vit"))
    # --- views (view 0 weak, view 1 strong, then optional extra strong crops) ---
    crop_min_scale: float = _f(0.2, "RandomResizedCrop lower scale of views 0 and 1 (official 0.2)", range="(0, 1]")
    blur_p: float = _f(0.0, "Gaussian-blur probability of the strong view (0 at 32 px, 0.5 at 224 px)",
                       range="[0, 1]")
    solarize_p: float = _f(0.2, "solarization probability of the strong view", range="[0, 1]")
    extra_crops: int = _f(0, "extra small strong crops (online branch only); 0 = the paper's 2 views",
                          range="[0, inf)")
    extra_crop_size: int = _f(96, "pixel size of the extra crops", range="[1, inf)")
    extra_crop_scale: tuple[float, float] = _f((0.05, 0.14), "RandomResizedCrop scale range of the extra crops",
                                               range="(0, 1]")
    # --- optimisation (paper Table 8) ---
    optimizer: str = _f("sgd", "sgd (momentum 0.9) or adamw", choices=("sgd", "adamw"))
    epochs: int = _f(1000, "training epochs (0: only the initial checkpoint)", range="[0, inf)")
    batch_size: int = _f(256, "GLOBAL batch over all ranks (per-rank = batch_size / world_size)", range="[1, inf)")
    lr: float = _f(0.3, "base learning rate per 256 images; actual lr = lr * batch_size / 256", range="(0, inf)")
    final_lr_ratio: float = _f(0.1, "cosine floor as a fraction of lr (official SGD: 0.1, not 0)", range="[0, 1]")
    weight_decay: float = _f(1e-4, "weight decay on ALL parameters, BN and biases included (official)",
                             range="[0, inf)")
    warmup_epochs: float = _f(2, "linear lr warm-up from 0, per step", range="[0, inf)")
    # --- data / system ---
    preset: str = _f("", "hyperparameter preset, applied first (see the list below)")
    dataset: str = _f("cifar10", "training set", choices=common.DATASETS)
    data_dir: str | None = _f(None, "dataset root (imagefolder: the folder holding train/)")
    download: bool = _f(False, "download torchvision datasets if missing")
    image_size: int = _f(0, "training resolution; 0 = the dataset's native size", range="[0, inf)")
    train_subset: int = _f(0, "class-stratified subset of the train split; 0 = all", range="[0, inf)")
    backbone: str = _f("resnet18", "encoder f", choices=common.BACKBONES)
    zero_init_residual: bool = _f(False, "zero-init the last BN of each residual block (official: not for R18)")
    drop_path: float = _f(0.0, "ViT stochastic depth rate of the online encoder's last block (linear over "
                          "depth; momentum encoder 0); official ViT code: 0 (its default; its scripts keep it)",
                          range="[0, 1]")
    workers: int = _f(8, "data-loading workers per rank", range="[0, inf)")
    data_path: str = _f("auto", "device = images on the training device, views made there in batches; loader = "
                        "DataLoader workers; auto = device when the set fits (common.py)",
                        choices=("auto", "device", "loader"))
    seed: int = _f(0, "random seed")
    output_dir: str = _f("runs/resa", "run directory: log.jsonl and ckpt_epoch*.pt")
    save_every: int = _f(50, "checkpoint every N epochs (plus epoch 0 and the last)", range="[1, inf)")
    resume: str = _f("", "PATH: continue from that checkpoint (strict: model, momentum, optimizer, step); auto: "
                         "the newest in --output-dir, or start fresh (resubmittable after a preemption)")
    skip_bad_images: bool = _f(False, "skip unreadable image files (counted as data/skipped_images) instead of "
                                      "stopping")
    precision: str = _f("auto", "auto = bf16 on GPUs with native bf16, fp16 + GradScaler on older GPUs, fp32 on "
                                "CPU; Sinkhorn and the loss stay float32", choices=common.PRECISIONS)
    compile: bool = _f(False, "torch.compile the online and momentum networks")
    log_every: int = _f(50, "log every N steps", range="[1, inf)")


PRESETS = {
    # Table 8 + official resa_cifar/args.py (1000 epochs, no predictor, fp32 there, no blur at 32 px).
    "cifar10": dict(dataset="cifar10", backbone="resnet18", epochs=1000, batch_size=256, lr=0.3,
                    weight_decay=1e-4, warmup_epochs=2, predictor=False, blur_p=0.0),
    "cifar100": dict(dataset="cifar100", backbone="resnet18", epochs=1000, batch_size=256, lr=0.3,
                     weight_decay=1e-4, warmup_epochs=2, predictor=False, blur_p=0.0),
    # Table 8 (bs 128, lr 0.5, wd 2.5e-5, warm-up 2) + Table 3 caption (400 epochs). No official IN-100
    # config exists; predictor, blur and zero-init follow the ImageNet code [unverified for IN-100].
    "imagenet100": dict(dataset="imagefolder", image_size=224, backbone="resnet18", epochs=400,
                        batch_size=128, lr=0.5, weight_decay=2.5e-5, warmup_epochs=2, predictor=True,
                        blur_p=0.5, zero_init_residual=True),
    # Table 8 + official resa/args.py and README (100 or 200 epochs at bs 256; 25 GB on one GPU with AMP).
    "imagenet": dict(dataset="imagefolder", image_size=224, backbone="resnet50", epochs=200, batch_size=256,
                     lr=0.5, weight_decay=1e-5, warmup_epochs=2, predictor=True, blur_p=0.5,
                     zero_init_residual=True),
    # Table 8 + official README (`--warmup_epochs 10`, 4 x 256; 100/200/800 epochs, 800 uses lr 0.4).
    "imagenet_bs1024": dict(dataset="imagefolder", image_size=224, backbone="resnet50", epochs=200,
                            batch_size=1024, lr=0.5, weight_decay=1e-5, warmup_epochs=10, predictor=True,
                            blur_p=0.5, zero_init_residual=True),
    # Table 8 (AdamW, bs 1024, lr 5e-4, wd 0.1, warm-up 40) + the ViT code deleted from the official repo
    # in Apr 2025 (300 epochs, final lr 1e-4, GELU heads without BN) [unverified: the lr scaling rule].
    # DEVIATION: common.ViT has DINO's learned position embedding and trunc-normal init; that deleted code used
    # MoCo v3's (fixed 2-D sin-cos positions, frozen random patch embedding, xavier-uniform Linears).
    "vit_small": dict(dataset="imagefolder", image_size=224, backbone="vit_small", epochs=300, batch_size=1024,
                      optimizer="adamw", lr=5e-4, final_lr_ratio=0.2, weight_decay=0.1, warmup_epochs=40,
                      predictor=True, head_style="vit", blur_p=0.5,
                      drop_path=0.0),  # OFFICIAL (deleted args.py): --drop_path 0, kept by vits16.sh
    # Ours: CPU demo (scikit-learn digits, tiny convnet, small heads). The digits are 8x8 images, so 16 px
    # loses nothing and costs a quarter of 32 px; the short run needs a faster EMA to move the momentum net.
    "digits": dict(dataset="digits", image_size=16, backbone="convnet", epochs=6, batch_size=128, lr=0.3,
                   weight_decay=1e-4, warmup_epochs=1, proj_hidden=256, emb_dim=64, ema_base=0.99,
                   workers=0, save_every=2, log_every=11),
}


# ===================================== METHOD: ReSA, paper method section + App. B ======================
# Symbols (shapes per step):
#   V views (0 weak, 1 strong, 2.. extra strong crops); B local batch; W world size; N = B * W global batch
#   H_v = f(x_v)            (B, D)  online ENCODER output (pooled backbone feature)
#   Z_v = n(p(g(H_v)))      (B, E)  online embedding (g projector, p optional predictor, n = L2 norm)
#   Hbar_0 = fbar(x_0)      (B, D)  MOMENTUM encoding of the weak view (gathered to (N, D) for the columns of A)
#   Zbar_v = n(gbar(fbar(x_v))) (N, E)  momentum embeddings of views 0 and 1, gathered over ranks, no gradient
#   A = SK(n(H_0) n(Hbar_0)^T)  (B, N)  self-assignment: local rows x global columns, rows sum to 1
#   tau = 0.4 (loss temperature), eps = 0.05 (Sinkhorn temperature), m: EMA coefficient 0.996 -> 1


def build_projector(in_dim, hidden=2048, out=512, style="resnet"):
    """g: 3-layer MLP (App. B: 2048 hidden, 512 out). Plain torch.nn layers so the checkpoint can store it."""
    if style == "vit":  # deleted official ViT head: GELU, no BN [unverified beyond that]
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, out))
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out),
        nn.BatchNorm1d(out, affine=False),  # OFFICIAL: src/model.py: non-affine BN before the L2 norm
    )


def build_predictor(dim=512, hidden=2048, style="resnet"):
    """p: OFFICIAL resa src/model.py (ImageNet only, on by default; online branch only)."""
    if style == "vit":
        return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim))


class ReSANet(nn.Module):
    """Encoder f, projector g, optional predictor p. forward(list of views) -> ([H_v], [Z_v]).

    Each view goes through the network on its own, so BatchNorm sees per-view statistics (OFFICIAL:
    method/base.py warns that concatenating views changes the method). One forward call takes all views so
    DDP sees a single forward per step."""

    def __init__(self, encoder, projector, predictor=None):
        super().__init__()
        self.encoder, self.projector = encoder, projector
        self.predictor = predictor if predictor is not None else nn.Identity()

    def forward(self, views):
        H = [self.encoder(x) for x in views]                                   # V x (B, D)
        Z = [F.normalize(self.predictor(self.projector(h)), dim=1) for h in H]  # V x (B, E)
        return H, Z


@torch.no_grad()
def ema_update_(momentum_params, online_params, m):
    """theta_bar <- m * theta_bar + (1 - m) * theta, parameters only: BN running statistics of the momentum
    net evolve by themselves, since it runs in train mode (OFFICIAL: method/resa.py)."""
    torch._foreach_lerp_(momentum_params, online_params, 1.0 - m)  # one fused kernel per tensor group


@torch.no_grad()
def sinkhorn_knopp(scores, eps=0.05, iters=3):
    """App. B: SK(S) for S (B, N) = local rows of the global (N_rows, N) similarity matrix -> A (B, N).

    Alternately scales the columns and rows of Q = exp(S / eps) so that the GLOBAL matrix has uniform
    marginals (each column sums to 1/N, each row to 1/N_rows). Column sums run over every rank's rows, hence
    the all-reduce; row sums are local. Ends on a row step, then rescales so every row sums to exactly 1;
    columns are then only approximately uniform (3 iterations). float32 throughout: exp(1 / 0.05) = e^20
    overflows float16, and bf16 would blur the scores by ~8% after dividing by eps. Cosine scores are in
    [-1, 1], so exp(S / eps) <= e^20 needs no max-shift in float32."""
    n_rows = scores.shape[0] * common.get_world_size()  # every rank holds the same number of rows
    n_cols = scores.shape[1]
    with torch.autocast(scores.device.type, enabled=False):
        Q = torch.exp(scores.float() / eps)                                   # (B, N)
        Q /= common.all_reduce_sum(Q.sum())                                   # total mass 1
        for _ in range(iters):
            Q /= common.all_reduce_sum(Q.sum(dim=0, keepdim=True)) * n_cols  # columns now sum to 1/N
            Q /= Q.sum(dim=1, keepdim=True) * n_rows                         # rows now sum to 1/N_rows
        return Q * n_rows                                                     # rows sum to 1


@torch.no_grad()
def self_assignment(h_online, h_momentum, eps=0.05, iters=3):
    """A = SK(n(H_0) n(Hbar_0)^T): (B, D) online and (B, D) momentum weak-view ENCODINGS -> (B, N).

    OFFICIAL (final code of both repos): rows from the ONLINE encoder (detached), columns from the MOMENTUM
    encoder gathered over ranks; both on the weak view 0; encoder output, not projector output."""
    with torch.autocast(h_online.device.type, enabled=False):
        h = F.normalize(h_online.detach().float(), dim=1)                         # (B, D)
        h_bar = common.all_gather_nograd(F.normalize(h_momentum.float(), dim=1))  # (N, D)
        return sinkhorn_knopp(h @ h_bar.T, eps, iters)                            # (B, N)


def resa_loss(z_online, z_momentum, A, temperature=0.4, two_sided=False):
    """Eq. (3), final official form: mean over pairs (q, v), q online view, v in {0, 1} momentum view, q != v
    (2V - 2 terms), of CE(A, softmax(Z_q Zbar_v^T / tau)) averaged over the local rows.

    z_online: V x (B, E) unit rows, with gradient; z_momentum: 2 x (N, E) unit rows, gathered, no gradient;
    A: (B, N). OFFICIAL: method/resa.py (resa_cifar 9047689, resa c51fddc): the same A for both orderings;
    the symmetry of the paper's Eq. (3) comes from swapping the views. With DDP's gradient averaging the
    mean over local rows gives exactly the gradient of the global-batch loss.

    two_sided=True: paper Eq. (3) / early official code (714a2fc): each term also has the column
    cross-entropy CE(A^T, softmax over ONLINE samples of Zbar_v Z_q^T / tau), which needs every rank's
    online embeddings (gathered with gradient) and this rank's columns of the global A.

    A float32 island whatever the caller's autocast (bf16 similarities cost ~0.4 % relative gradient error at
    B 256, N 1024, tau 0.4): the embeddings are cast up and autocast is off inside."""
    terms = []
    with torch.autocast(A.device.type, enabled=False):
        A = A.float()
        for q, z in enumerate(z_online):
            z = z.float()
            for v, z_bar in enumerate(z_momentum):
                if q == v:  # App. B: a view is never asked to predict itself
                    continue
                z_bar = z_bar.float()
                term = F.cross_entropy(z @ z_bar.T / temperature, A)                  # Eq. (3), rows (B, N)
                if two_sided:
                    own = slice(common.get_rank() * A.shape[0], (common.get_rank() + 1) * A.shape[0])
                    z_all = common.gather_with_grad(z)                                # (N, E)
                    A_cols = common.all_gather_nograd(A)[:, own].T                    # (B, N) = A^T, own columns
                    col = F.cross_entropy(z_bar[own] @ z_all.T / temperature, A_cols)  # Eq. (3), columns
                    term = (term + col) / 2
                terms.append(term)
    return torch.stack(terms).mean()


@torch.no_grad()
def assignment_stats(A):
    """Diagnostics (not in the loss): mean row entropy of A in nats (log N = uniform, 0 = one-hot) and the
    mean weight a sample puts on its own momentum encoding (the diagonal of the global matrix)."""
    own = torch.arange(A.shape[0], device=A.device) + common.get_rank() * A.shape[0]
    entropy = -(A * A.clamp_min(1e-12).log()).sum(1).mean()
    return {"resa/a_entropy": entropy, "resa/a_self": A[torch.arange(A.shape[0]), own].mean()}


# ===================================== VIEWS: asymmetric weak / strong pair ============================
def build_views(args, info):
    """[weak, strong, extra strong crops...] of one image. OFFICIAL: src/transform.py: view 0 is WEAK
    (crop + flip, bilinear) and view 1 STRONG (bicubic crop, jitter 0.4/0.4/0.2/0.1 w.p. 0.8, grayscale
    0.2, blur, solarize 0.2, flip); swapping them changes the method, since only view 0 builds A."""
    norm = dict(mean=info.mean, std=info.std)
    crop = (args.crop_min_scale, 1.0)
    weak = common.Augment(info.image_size, scale=crop, interpolation="bilinear", flip_p=0.5, jitter_p=0.0,
                          gray_p=0.0, **norm)
    strong_recipe = dict(interpolation="bicubic", flip_p=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                         gray_p=0.2, blur_p=args.blur_p, solarize_p=args.solarize_p, **norm)
    # DEVIATION: torchvision-v2 blur, kernel ~10% of the crop (official: PIL blur of radius sigma)
    strong = common.Augment(info.image_size, scale=crop, **strong_recipe)
    # OFFICIAL: --crops_nmb 1 N --crops_size 224 96: extra crops are strong views seen by the online net only
    extra = common.Augment(args.extra_crop_size, scale=args.extra_crop_scale, **strong_recipe)
    return common.MultiView([weak, strong] + [extra] * args.extra_crops)


# ===================================== TRAINING LOOP: plumbing =========================================
def main(argv=None):
    args = common.parse_args(Args, PRESETS, argv)
    dist = common.setup_distributed()
    common.check_writable(args.output_dir)  # a bad --output-dir fails now, in one line, not after an epoch
    device, cuda = dist.device, dist.device.type == "cuda"
    # Same seed on every rank: the momentum net is a copy of the online init, and DDP only broadcasts the
    # online net. Augmentations are seeded by (seed, epoch, index) inside the loader.
    common.seed_everything(args.seed)
    per_rank = common.split_batch(args.batch_size, dist.world_size)
    # DEVIATION: --precision auto is bf16 on GPUs that have it (official: fp32 on CIFAR, fp16 + GradScaler on
    # ImageNet; both are a flag away). Sinkhorn, the similarities and the loss run in float32 in every mode.
    prec = common.MixedPrecision(args.precision, device)
    common.print0(f"resa: {args}\nglobal batch {args.batch_size} = {dist.world_size} ranks x {per_rank}, "
                  f"precision {prec.name}")

    # --- data ---
    info = common.dataset_info(args.dataset, args.image_size or None)
    dataset = common.build_dataset(args.dataset, "train", build_views(args, info), args.data_dir, args.download,
                                   args.train_subset, args.seed, image_size=info.image_size,
                                   skip_bad=args.skip_bad_images)
    loader = common.build_train_loader(dataset, per_rank, dist, args.data_path, args.workers, seed=args.seed)

    # --- online net (encoder, projector, predictor) and momentum net (encoder, projector) ---
    # DEVIATION: common's CIFAR stem (32 px) lacks the official 1-px zero-pad before conv1 (34x34 maps there)
    encoder, feat_dim = common.build_backbone(args.backbone, info.image_size, drop_path=args.drop_path,
                                              zero_init_residual=args.zero_init_residual)
    if args.extra_crops and args.extra_crop_size % getattr(encoder, "patch_size", 1):  # ViT: patch multiples
        raise common.UsageError(f"--extra-crop-size {args.extra_crop_size} is not a multiple of the ViT patch "
                                f"size {encoder.patch_size}")
    spec = common.backbone_spec(args.backbone, info.image_size, zero_init_residual=args.zero_init_residual)
    projector = build_projector(feat_dim, args.proj_hidden, args.emb_dim, args.head_style)
    predictor = build_predictor(args.emb_dim, args.proj_hidden, args.head_style) if args.predictor else None
    online = ReSANet(encoder, projector, predictor)
    if args.head_style == "vit":  # deleted official ViT code: xavier-uniform heads
        for mod in list(projector.modules()) + list((predictor or nn.Identity()).modules()):
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
    momentum = ReSANet(common.disable_drop_path(copy.deepcopy(encoder)),  # it runs in train mode: rate 0
                       copy.deepcopy(projector)).requires_grad_(False)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    online.to(device, memory_format=fmt)
    momentum.to(device, memory_format=fmt)
    if cuda and dist.world_size > 1:  # OFFICIAL: the whole model, momentum net included, uses SyncBN
        momentum = nn.SyncBatchNorm.convert_sync_batchnorm(momentum)
    model = common.ddp_wrap(online, dist)  # SyncBN (CUDA) keeps the Parameter objects, so pair them after it
    ema_pairs = (list(momentum.parameters()), list(online.encoder.parameters()) + list(projector.parameters()))

    # --- optimizer: ONE group; OFFICIAL: weight decay on every parameter, BN and biases included ---
    lr = args.lr * args.batch_size / 256  # linear scaling rule (official main.py)
    opt = (torch.optim.SGD(online.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay)
           if args.optimizer == "sgd" else
           torch.optim.AdamW(online.parameters(), lr=lr, weight_decay=args.weight_decay))

    # --- schedules: pure functions of the global step (resume needs no scheduler state) ---
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    # OFFICIAL: linear warm-up from 0, then cosine to 0.1 x lr, per step (src/utils.py). DEVIATION: the
    # official linspace reaches lr one step before the end of the warm-up; here at its end.
    def lr_at(step):
        return common.cosine_schedule(step, total_steps, lr, args.final_lr_ratio * lr, warmup_steps)

    def ema_at(step):  # App. B: m from ema_base to 1 on a half cosine, per step, no warm-up (OFFICIAL utils.py)
        return common.cosine_schedule(step, total_steps, args.ema_base, 1.0)

    common.print0(f"{len(dataset)} images, {steps_per_epoch} steps/epoch, {total_steps} steps, lr {lr:.4g}")

    # --- resume (strict: every tensor must fit): --resume PATH | auto ---
    step = 0
    ckpt = common.resume_checkpoint(args, "resa")
    if ckpt is not None:
        state = ckpt["train_state"]
        if state["steps_per_epoch"] != steps_per_epoch:
            raise common.CheckpointError(f"{args.resume}: {state['steps_per_epoch']} steps/epoch there, "
                                         f"{steps_per_epoch} here; resume with the same data and batch size")
        common.load_train_state(ckpt, args, online=online, momentum=momentum, optimizer=opt, scaler=prec)
        step = ckpt["step"]
        common.print0(f"resumed at epoch {step // steps_per_epoch}, step {step}")
    model, momentum_fwd = (torch.compile(model), torch.compile(momentum)) if args.compile else (model, momentum)

    logger = common.RunLogger(args.output_dir, dist, total_steps, start_step=step)
    logger.write_config({"config": dataclasses.asdict(args), "precision": prec.name, "start_step": step})
    guard = common.DivergenceGuard(device, steps_per_epoch, total_steps, lr_at, args.output_dir)
    stop = common.StopSignal(dist)

    def save(epoch, mid_epoch=False):  # every rank calls it (the guard's check is collective)
        guard.check()  # never a checkpoint of a diverged state
        if not dist.is_main:
            return
        state = {"online": online.state_dict(), "momentum": momentum.state_dict(), "optimizer": opt.state_dict(),
                 "scaler": prec.state_dict(), "steps_per_epoch": steps_per_epoch}
        # evaluation uses the MOMENTUM encoder and projector (official); a SyncBatchNorm is stored as the
        # BatchNorm1d it evaluates as (same state keys)
        ckpt = common.make_checkpoint("resa", epoch, step, args, spec, momentum.encoder, "momentum", info, state,
                                      heads={"projector": momentum.projector, "normalize_output": True},
                                      precision=prec.name)
        common.save_checkpoint(f"{args.output_dir}/{common.checkpoint_name(epoch, step if mid_epoch else None)}",
                               ckpt)
        common.prune_interrupted(args.output_dir, step)

    if step == 0:
        save(0)
    for epoch in range(step // steps_per_epoch, args.epochs):
        loader.set_epoch(epoch, start_batch=step - epoch * steps_per_epoch)  # > 0 only after a mid-epoch stop
        model.train()
        momentum.train()  # OFFICIAL: the momentum net uses batch statistics too
        for views, _ in logger.timed(loader):
            common.seed_step(args.seed, step, dist.rank)
            lr_t, m = lr_at(step), ema_at(step)
            for group in opt.param_groups:
                group["lr"] = lr_t
            views = [x.to(device, non_blocking=True, memory_format=fmt) for x in views]
            with prec.autocast():
                H, Z = model(views)                                                # online: every view
            ema_update_(*ema_pairs, m)  # OFFICIAL: after the online pass, before momentum pass and step
            with torch.no_grad(), prec.autocast():
                H_bar, Z_bar = momentum_fwd(views[:2])                             # momentum: views 0, 1
            A = self_assignment(H[0], H_bar[0], args.sk_eps, args.sk_iters)       # App. B, (B, N), float32
            Z_bar = [common.all_gather_nograd(z.float()) for z in Z_bar]          # 2 x (N, E)
            loss = resa_loss(Z, Z_bar, A, args.temperature, args.two_sided)       # Eq. (3), float32
            opt.zero_grad(set_to_none=True)
            prec.scaler.scale(loss).backward()  # the scaler is a no-op outside fp16; no clipping (official)
            prec.scaler.step(opt)
            prec.scaler.update()
            step += 1  # steps completed
            guard.update(loss, step)
            if step % args.log_every == 0 or step == total_steps:
                guard.check()
                logger.step_line(epoch, step, common.all_reduce_mean(loss.detach()), lr_t, args.batch_size,
                                 extra={"sched/ema": m, **assignment_stats(A),
                                        "data/skipped_images": loader.skipped_images})
            if stop():  # SIGTERM / SIGUSR1 (preemption): every rank leaves after this same step
                break
        # the one exit path: at the epoch's end a checkpoint if due; on a stop signal a mid-epoch one (unless
        # just written); then leave
        due = step == (epoch + 1) * steps_per_epoch and ((epoch + 1) % args.save_every == 0
                                                          or epoch + 1 == args.epochs)
        if due or stop.stopping:
            save(epoch + 1 if due else step // steps_per_epoch, mid_epoch=not due)
        if stop.stopping:
            common.print0(f"stopped by a signal after step {step}; rerun the same command with --resume auto")
            break
    stop.close()
    common.cleanup_distributed()


# ===================================== THE PAPER'S MEASUREMENTS: clustering per layer (Fig. 3) =========
# Sec. "clustering properties", Fig. 3: for the encoder output H, every hidden layer of the projector (the
# output of each activation: the stored nn.Sequential is sliced) and the embedding Z, at every checkpoint: the
# silhouette coefficient with the ground-truth classes as clusters, its mean over images (SC_mean, local cluster
# quality) and standard deviation (SC_std, stability), and the adjusted Rand index of k-means (K = number of
# classes) against the classes (ARI, global quality); fine labels, and CIFAR-100's 20 superclasses as "coarse".
# our choice (the paper's procedure is not readable here): the test split; features L2-normalised for the cosine
# metric, so k-means and the silhouette see the geometry the loss uses; k-means with 3 seeded restarts.
def layer_properties(x, labels, metric="cosine", seed=0, n_init=3):
    """SC_mean, SC_std and ARI of one layer's features x (N, D) against class labels (N,) -> dict."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_samples

    x = (F.normalize(x.float(), dim=1) if metric == "cosine" else x.float()).numpy()
    sc = silhouette_samples(x, labels.numpy(), metric=metric)  # (N,)
    kmeans = KMeans(len(torch.unique(labels)), n_init=n_init, random_state=seed)
    ari = adjusted_rand_score(labels.numpy(), kmeans.fit_predict(x))
    return {"sc_mean": float(sc.mean()), "sc_std": float(sc.std()), "ari": float(ari)}


def analyze(argv):
    """`python resa.py analyze RUN_DIR`: ReSA's clustering properties of every layer at every checkpoint
    (Fig. 3) -> resa.csv (checkpoint, epoch, layer, granularity, split, n, sc_mean, sc_std, ari) and
    monitor_resa.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = common.ArgParser(prog="resa.py analyze", description=analyze.__doc__)  # usage errors: one line, exit 2
    p.add_argument("run", help="run directory (every *.pt, in epoch order) or one checkpoint")
    p.add_argument("--out-dir", default="", help="where the outputs go (default: the run directory)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="split analysed")
    p.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine", help="silhouette distance")
    p.add_argument("--data-dir", default=None, help="override the data directory stored in the checkpoints")
    for flag, low, default, text in (
            ("--samples", 0, 5000, "class-stratified subset of the split (0 = all; else more than the classes)"),
            ("--n-init", 1, 3, "k-means restarts (k-means++ init each)"), ("--seed", 0, 0, "k-means seed"),
            ("--batch-size", 1, 256, ""), ("--workers", 0, 0, ""), ("--threads", 0, 1, "CPU threads (0 = all)")):
        p.add_argument(flag, type=common.ranged(int, f"[{low}, inf)"), default=default, help=text)
    a = p.parse_args(argv)
    paths, run_name = common.list_checkpoints(a.run), common.run_dir_of(a.run).name  # the run first, then
    out = common.check_writable(a.out_dir or common.run_dir_of(a.run))  # a read-only output: one line, no work
    device, rows, loader = common.select_device(), [], None
    progress = common.Progress("resa.py analyze", len(paths), "checkpoints")
    with common.cpu_threads(a.threads):
        for path in paths:
            ckpt = common.load_checkpoint(path)
            (backbone, meta), heads = common.load_backbone(ckpt), common.load_heads(ckpt)
            if 0 < a.samples <= meta["data"]["num_classes"]:  # the silhouette and k-means need more images
                p.error(f"argument --samples: {a.samples} images for {meta['data']['num_classes']} classes; give "
                        f"more than the classes (or 0 = all)")
            loader = loader or common.eval_loader(meta, a.split, a.data_dir, a.batch_size, a.workers, a.samples)
            h, y = common.extract_features(backbone.to(device), loader, device)  # (N, D) encoder output H
            layers, proj = [("encoder", h)], heads.get("projector")
            if proj is not None:
                with torch.no_grad():
                    acts = [i for i, m in enumerate(proj.eval()) if isinstance(m, (nn.ReLU, nn.GELU))]
                    layers += [(f"proj_hidden{j}", proj[:i + 1](h)) for j, i in enumerate(acts)]
                    z = proj(h)  # (N, d) embedding Z
                layers.append(("embedding", F.normalize(z, dim=1) if heads.get("normalize_output") else z))
            coarse = getattr(loader.dataset, "coarse_targets", None)
            for gran, labels in [("fine", y)] + ([("coarse", coarse)] if coarse is not None else []):
                rows += [{"checkpoint": path.name, "epoch": int(meta["epoch"]), "layer": layer,
                          "granularity": gran, "split": a.split, "n": len(labels),
                          **layer_properties(x, labels, a.metric, a.seed, a.n_init)} for layer, x in layers]
            common.print0(f"{path.name}: " + " ".join(f"{r['layer']}/{r['granularity']} sc_mean "
                                                      f"{r['sc_mean']:.3f} ari {r['ari']:.3f}"
                                                      for r in rows if r["checkpoint"] == path.name))
            progress.update(1)
    common.write_csv(out / "resa.csv", rows, list(rows[0]))  # creates out
    grans, layers = (list(dict.fromkeys(r[k] for r in rows)) for k in ("granularity", "layer"))
    fig, axes = plt.subplots(len(grans), 3, figsize=(11, 3.2 * len(grans)), squeeze=False)
    for g, gran in enumerate(grans):
        for j, key in enumerate(("sc_mean", "sc_std", "ari")):
            for layer in layers:
                pts = [(r["epoch"], r[key]) for r in rows if r["layer"] == layer and r["granularity"] == gran]
                axes[g, j].plot(*zip(*pts), "o-", ms=3, label=layer)
            axes[g, j].set(title=f"{key} ({gran} labels)", xlabel="epoch", ylabel=f"{key} (dimensionless)")
            axes[g, j].xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.suptitle(f"run {run_name} ({meta['method']}): ReSA clustering properties ({a.split} split, {a.metric})")
    fig.tight_layout(rect=(0, 0, 0.86, 1))  # the legend goes right of the panels: it covers no data
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.03, 1))
    fig.savefig(out / "monitor_resa.png", dpi=110)
    common.print0(f"wrote resa.csv and monitor_resa.png to {out}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["analyze"]:
        common.run(lambda: analyze(sys.argv[2:]))
    else:
        common.run(main)
