"""Checkpoints that other code loads as it is (issue 22): `python common.py export` and the README's own lines.

The README's torchvision block is executed as written (with the file path swapped in): the module it builds gives
exactly common.load_backbone's features. timm is not a dependency: the ViT's key set and shapes are checked
against timm's layout, written out in tests/test_common_vit.py."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
from test_common_vit import _timm_vit_small_layout

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(tmp_path, name, size, method="simclr_nscl", **kwargs):
    model, _ = common.build_backbone(name, size, **kwargs)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrong stem or a missed buffer shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    info = common.dataset_info("cifar10", size)
    ckpt = common.make_checkpoint(method, 3, 30, {"seed": 0}, common.backbone_spec(name, size, **kwargs),
                                  model, "online", info, train_state={})
    return common.save_checkpoint(tmp_path / "ckpt_epoch0003.pt", ckpt)


def _readme_block(after: str, index: int = 0) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(after):]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[index]


@pytest.mark.parametrize("size, method", [(32, "simclr_nscl"), (96, "excb"), (32, "resa")])  # both ResNet stems
def test_the_readme_lines_load_an_exported_resnet_into_torchvision(tmp_path, size, method):
    ckpt = _checkpoint(tmp_path, "resnet18", size, method)
    exported = tmp_path / "ckpt_epoch0003_backbone.pt"
    if method == "simclr_nscl":  # the documented command once, in a real interpreter; in-process otherwise
        out = subprocess.run([sys.executable, "common.py", "export", str(ckpt)], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and str(exported) in out.stdout, out.stderr
    else:
        assert common.export_backbone(ckpt) == exported
    code = _readme_block("## Using a backbone elsewhere")
    code = re.sub(r'torch\.load\("[^"]+"', f'torch.load("{exported}"', code)
    scope = {}
    exec(code, scope)  # the README's lines, as a user runs them
    model, b = scope["model"], scope["b"]
    assert isinstance(model, type(common.build_backbone("resnet18", size)[0])) and b["image_size"] == size
    ours, meta = common.load_backbone(ckpt)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), rtol=0, atol=0)
    assert b["mean"] == meta["data"]["mean"] and b["method"] == method and b["epoch"] == 3
    trained, exported = b["provenance"]["trained"], b["provenance"]["exported"]
    assert trained["created"].endswith("Z") and exported["created"].endswith("Z") and trained["world_size"] == 1
    assert trained["torchvision_version"] and isinstance(trained.get("git_dirty", False), bool)
    assert "train_state" not in b and "heads" not in b  # the backbone alone


def test_an_exported_vit_has_timms_names_and_old_vit_checkpoints_still_load(tmp_path):
    ckpt = _checkpoint(tmp_path, "vit_small", 32)
    b = torch.load(common.export_backbone(ckpt, tmp_path / "vit.pt"), weights_only=True)
    assert {k: tuple(v.shape) for k, v in b["state_dict"].items()} == _timm_vit_small_layout(8, 4)
    assert b["kwargs"]["patch_size"] == 4 and b["arch"] == "vit_small"
    # a checkpoint of the old layout (blocks.N.qkv, blocks.N.mlp.0, patch_embed.weight): the five renames back
    state = torch.load(ckpt, weights_only=True)
    old = {}
    for k, v in state["eval_backbone"].items():
        for new, before in (("patch_embed.proj.", "patch_embed."), (".attn.qkv.", ".qkv."),
                            (".attn.proj.", ".proj."), (".mlp.fc1.", ".mlp.0."), (".mlp.fc2.", ".mlp.2.")):
            k = k.replace(new, before)
        old[k] = v
    assert "blocks.0.qkv.weight" in old and "patch_embed.weight" in old
    state["eval_backbone"] = old
    common.save_checkpoint(tmp_path / "old.pt", state)
    loaded, _ = common.load_backbone(tmp_path / "old.pt")  # strict: every tensor found its place
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_export_usage_errors_are_one_line(tmp_path):
    for argv, code in ((["export", str(tmp_path / "missing.pt")], 1),):  # a usage error: the same run() path
        out = subprocess.run([sys.executable, "common.py", *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
