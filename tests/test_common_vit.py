"""common.py's ViT (DINO layout): position-embedding resampling, drop-path, the attention against a slow
reference, the ViT-S/16 parameter count, checkpoints without drop-path, one forward/backward of each ViT
preset's model with 2 global + 2 local crops, and digits-sized runs of excb.py / resa.py that probe.py reads."""
import copy
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import stochastic_depth

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import excb  # noqa: E402
import resa  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def small_vit(drop_path=0.0, image_size=32):
    """Reduced ViT (patch 8: a 4 x 4 grid at 32 px, 2 x 2 at 16 px)."""
    return common.ViT(image_size, patch_size=8, dim=48, depth=3, heads=3, drop_path=drop_path)


# ------------------------------------------------------------------------------ position embedding


def test_pos_embed_is_the_identity_at_the_training_grid():
    torch.manual_seed(0)
    vit = common.build_backbone("vit_small", 224)[0]
    assert vit.patch_size == 16 and vit.grid == 14 and vit.pos_embed.shape == (1, 197, 384)
    assert vit.pos_embed_for(14, 14) is vit.pos_embed
    # the shortcut hides nothing: bicubic resampling onto the same grid returns the input too
    grid = vit.pos_embed[:, 1:].detach().reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    same = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    torch.testing.assert_close(same, grid, rtol=0, atol=1e-6)


@pytest.mark.parametrize("train_px,patch,input_px", [(224, 16, 96), (224, 16, 160), (32, 4, 16), (16, 4, 8),
                                                     (16, 4, 32)])
def test_pos_embed_resampled_to_any_patch_grid(train_px, patch, input_px):
    torch.manual_seed(0)
    vit = common.build_backbone("vit_small", train_px)[0]
    assert vit.patch_size == patch
    n = input_px // patch
    pe = vit.pos_embed_for(n, n)
    assert pe.shape == (1, 1 + n * n, 384)
    assert torch.equal(pe[:, 0], vit.pos_embed[:, 0])  # the class token's entry is not resampled
    with torch.no_grad():  # bicubic weights sum to 1: a constant field stays that constant at any grid
        vit.pos_embed[:, 1:] = torch.linspace(-1, 1, 384)
    torch.testing.assert_close(vit.pos_embed_for(n, n)[0, 1:], torch.linspace(-1, 1, 384).expand(n * n, -1))
    vit.eval()
    with torch.no_grad():
        assert vit(torch.randn(2, 3, input_px, input_px)).shape == (2, 384)


def test_input_not_a_patch_multiple_is_refused():
    vit = small_vit()
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        vit(torch.randn(1, 3, 20, 20))
    with pytest.raises(ValueError, match="divisible by its patch size"):
        common.build_backbone("vit_small", 30)
    with pytest.raises(common.UsageError, match="needs --backbone vit_small"):
        common.build_backbone("resnet18", 32, drop_path=0.1)


# ------------------------------------------------------------------------------------- drop-path


def drop_path(x, p, training):
    return stochastic_depth(x, p, "row", training)  # the call ViTBlock makes


def test_drop_path_is_identity_in_eval_and_rescales_survivors_in_training():
    torch.manual_seed(0)
    x = torch.randn(4000, 5, 3)
    assert drop_path(x, 0.3, training=False) is x
    assert drop_path(x, 0.0, training=True) is x
    p = 0.25
    out = drop_path(x, p, training=True)
    kept = out.flatten(1).ne(0).any(1)  # a sample's whole branch is either kept or dropped
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    assert torch.equal(out[kept], x[kept] * (1 / (1 - p)))  # survivors scaled by exactly 1 / (1 - p)
    assert abs(kept.float().mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / len(x))


def test_drop_path_rates_are_linear_over_depth_and_off_in_eval_and_in_the_teacher_copy():
    full = common.build_backbone("vit_small", 224, drop_path=0.1)[0]
    torch.testing.assert_close(torch.tensor([b.drop_path for b in full.blocks]), torch.linspace(0, 0.1, 12))
    torch.manual_seed(0)
    student = small_vit(drop_path=0.4)
    assert [b.drop_path for b in student.blocks] == [0.0, 0.2, 0.4]
    x = torch.randn(16, 3, 32, 32)
    teacher = common.disable_drop_path(copy.deepcopy(student))
    assert [b.drop_path for b in teacher.blocks] == [0.0, 0.0, 0.0]
    assert [b.drop_path for b in student.blocks] == [0.0, 0.2, 0.4]  # the student keeps its rates
    with torch.no_grad():
        reference = student.eval()(x)  # eval: no drop-path
        teacher.train()  # the EMA teacher runs in train mode: with rate 0 that changes nothing (no BN)
        torch.testing.assert_close(teacher(x), reference)
        noisy = student.train()(x)
    assert not torch.allclose(noisy, reference)


def test_attention_against_a_slow_per_head_reference():
    torch.manual_seed(0)
    block = common.ViTBlock(12, heads=3)
    x = torch.randn(2, 5, 12)
    q, k, v = block.attn["qkv"](x).split(12, dim=-1)
    heads = []
    for h in range(3):  # softmax(q k^T / sqrt(d)) v, one head at a time, d = 12 / 3
        s = slice(4 * h, 4 * h + 4)
        heads.append(torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1) @ v[..., s])
    torch.testing.assert_close(block.attention(x), block.attn["proj"](torch.cat(heads, -1)))


# ------------------------------------------------------------------------ ViT-S/16, checkpoints


def test_vit_small_16_parameter_count_and_init():
    torch.manual_seed(0)
    vit, dim = common.build_backbone("vit_small", 224)
    n = sum(p.numel() for p in vit.parameters())
    # patch embedding 16*16*3*384 + 384, class token 384, positions 197*384, 12 blocks of (2 LayerNorms,
    # qkv 384 -> 1152, proj, MLP 384 -> 1536 -> 384, all with biases), final LayerNorm: 21.67 M, as DINO's ViT-S/16
    block = 4 * 384 + (384 * 1152 + 1152) + (384 * 384 + 384) + (384 * 1536 + 1536) + (1536 * 384 + 384)
    assert n == (16 * 16 * 3 * 384 + 384) + 384 + 197 * 384 + 12 * block + 2 * 384 == 21_665_664
    assert dim == vit.feature_dim == 384
    linear = vit.blocks[0].attn["qkv"]
    assert linear.bias.abs().sum() == 0 and abs(linear.weight.std().item() - 0.02) < 0.001
    assert abs(vit.pos_embed.std().item() - 0.02) < 0.002


def test_checkpoint_rebuilds_the_vit_without_drop_path(tmp_path):
    torch.manual_seed(0)
    vit, _ = common.build_backbone("vit_small", 16, drop_path=0.1)
    spec = common.backbone_spec("vit_small", 16, zero_init_residual=False, drop_path=0.1)
    assert spec["kwargs"] == {"zero_init_residual": False, "patch_size": 4, "drop_path": 0.0}
    assert "drop_path" not in common.backbone_spec("resnet18", 32, drop_path=0.0)["kwargs"]
    ckpt = common.make_checkpoint("excb", 1, 1, {"drop_path": 0.1}, spec, vit, "teacher",
                                  common.dataset_info("digits", 16), {})
    common.save_checkpoint(tmp_path / "c.pt", ckpt)
    loaded, meta = common.load_backbone(tmp_path / "c.pt")
    assert meta["args"]["drop_path"] == 0.1 and not loaded.training
    assert loaded.patch_size == 4 and all(b.drop_path == 0.0 for b in loaded.blocks)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.train()(x), vit.eval()(x))


# ------------------------------------------------ the ViT presets' models, 2 global + 2 local crops


def _crops(B=4):
    return [torch.randn(B, 3, 32, 32) for _ in range(2)], [torch.randn(B, 3, 16, 16) for _ in range(2)]


def _assert_every_backbone_parameter_learns(backbone):
    for name, p in backbone.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_excb_vit_preset_model_forward_backward():
    torch.manual_seed(0)
    preset = excb.PRESETS["imagenet_vits"]
    assert (preset["n_local"], preset["local_size"], preset["drop_path"]) == (6, 96, 0.1)
    B, K, G, L = 4, 8, 2, 2
    student = excb.ExCBNet(small_vit(preset["drop_path"]), 48, K, hidden=32, dim=16, style=preset["head_style"])
    teacher = common.disable_drop_path(copy.deepcopy(student))  # as excb.main builds it
    teacher.predictor = None
    teacher.requires_grad_(False)
    glob, local = _crops(B)
    x_g, x_l = torch.cat(glob), torch.cat(local)  # grouped by resolution: one backbone call each
    with torch.no_grad():
        z_t = teacher(x_g)[0].view(G, B, K)
    z_h, z_g = student(x_g, x_l)
    assert z_h.shape == (G * B, K) and z_g.shape == ((G + L) * B, K)
    p_t, _ = excb.teacher_targets(z_t, torch.full((K,), 1.0 / K))
    loss = excb.excb_loss(p_t, z_h.view(G, B, K), z_g.view(G + L, B, K))
    loss.backward()
    assert torch.isfinite(loss)
    _assert_every_backbone_parameter_learns(student.backbone)


def test_resa_vit_preset_model_forward_backward():
    torch.manual_seed(0)
    preset = resa.PRESETS["vit_small"]
    style = preset["head_style"]
    encoder = small_vit(0.1)  # the preset keeps 0; a rate here checks the momentum copy is built without it
    projector = resa.build_projector(48, 32, 16, style)
    online = resa.ReSANet(encoder, projector, resa.build_predictor(16, 32, style) if preset["predictor"] else None)
    momentum = resa.ReSANet(common.disable_drop_path(copy.deepcopy(encoder)), copy.deepcopy(projector))
    momentum.requires_grad_(False)
    glob, local = _crops()
    H, Z = online(glob + local)  # every view on its own: weak, strong, 2 extra crops
    assert [h.shape for h in H] == [(4, 48)] * 4 and [z.shape for z in Z] == [(4, 16)] * 4
    with torch.no_grad():
        H_bar, Z_bar = momentum(glob)
        A = resa.self_assignment(H[0], H_bar[0])
    loss = resa.resa_loss(Z, Z_bar, A)
    loss.backward()
    assert torch.isfinite(loss)
    _assert_every_backbone_parameter_learns(encoder)


# -------------------------------------------------- end to end: excb.py / resa.py with vit_small, probe.py

# digits at 16 px (patch 4: 4 x 4 grid) with 2 local / extra crops of 8 px (2 x 2), 32 images, batch 16: 2 steps
VIT_RUNS = {
    "excb": ["excb.py", "--preset", "digits", "--n-local", "2", "--local-size", "8", "--num-clusters", "8",
             "--kmeans-samples", "32", "--head-style", "vit"],
    "resa": ["resa.py", "--preset", "digits", "--extra-crops", "2", "--extra-crop-size", "8", "--head-style",
             "vit", "--predictor"],
}


@pytest.mark.parametrize("method", ["excb", pytest.param("resa", marks=pytest.mark.slow)])  # resa: -m slow
def test_vit_run_writes_a_checkpoint_probe_reads(method, tmp_path):
    import probe

    run_dir = tmp_path / method
    cmd = [*VIT_RUNS[method], "--backbone", "vit_small", "--drop-path", "0.1", "--train-subset", "32",
           "--batch-size", "16", "--epochs", "1", "--save-every", "1", "--proj-hidden", "64", "--log-every", "1",
           "--workers", "0", "--output-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ckpt = run_dir / "ckpt_epoch0001.pt"
    backbone, meta = common.load_backbone(ckpt)
    assert meta["method"] == method and meta["step"] == 2 and meta["args"]["drop_path"] == 0.1
    assert meta["backbone"]["kwargs"]["patch_size"] == 4 and meta["backbone"]["kwargs"]["drop_path"] == 0.0
    assert all(b.drop_path == 0.0 for b in backbone.blocks)
    stored = common.load_checkpoint(ckpt)["eval_backbone"]  # this method's real checkpoint: timm's ViT-S layout
    assert {k: tuple(v.shape) for k, v in stored.items()} == _timm_vit_small_layout(16 // 4, 4)
    probe.main([str(ckpt), "--probes", "knn", "--max-train", "100", "--max-test", "50", "--no-plots",
                "--out-dir", str(tmp_path / "probe")])
    rows = list(csv.DictReader(open(tmp_path / "probe" / "probe.csv")))
    assert rows and all(r["probe"] == "knn" and 0 <= float(r["value"]) <= 100 for r in rows)


def _timm_vit_small_layout(grid: int, patch: int, dim=384, depth=12, mlp=1536):
    """timm.create_model("vit_small_patch16_224", num_classes=0, img_size=S, patch_size=P).state_dict()'s keys and
    shapes, written out by hand (timm is not a dependency): class token, position embedding, patch_embed.proj,
    then per block norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2, and the final norm; head and fc_norm are
    Identity at num_classes=0 with the class-token pool, so they hold nothing."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp.fc1.weight": (mlp, dim), b + "mlp.fc1.bias": (mlp,),
                       b + "mlp.fc2.weight": (dim, mlp), b + "mlp.fc2.bias": (dim,)})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


@pytest.mark.parametrize("size, patch", [(224, 16), (32, 4)])
def test_vit_parameters_have_timms_names_and_shapes(size, patch):
    vit, _ = common.build_backbone("vit_small", size)
    got = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    assert got == _timm_vit_small_layout(size // patch, patch)  # all 150 tensors: a strict load into timm's ViT-S
