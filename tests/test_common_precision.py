"""--precision: how auto resolves, the fp16 path's GradScaler step, the float32 islands of every method under bf16
and fp16 autocast (CPU autocast runs the same dispatch as CUDA's), float32 feature extraction for evaluation, and
ExCB's device-side concatenation of the views."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import excb
import resa
import simclr_nscl

CPU = torch.device("cpu")
LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_auto_resolves_by_device_and_native_bf16(monkeypatch):
    assert common.resolve_precision("auto", CPU) == "fp32"
    assert [common.resolve_precision(p, CPU) for p in ("bf16", "fp16", "fp32")] == ["bf16", "fp16", "fp32"]
    with pytest.raises(common.UsageError, match="--precision takes"):
        common.resolve_precision("fp8", CPU)
    gpu = torch.device("cuda", 0)  # a stand-in: resolve_precision only asks torch.cuda what the GPU can do
    for native, want in ((True, "bf16"), (False, "fp16")):  # A100/H100 vs V100/T4
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert common.resolve_precision("auto", gpu) == want


def test_autocast_follows_the_precision_not_the_device_type():
    gpu = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the object is still built as asked
        assert not isinstance(common.autocast(gpu, "fp32"), torch.autocast)
        assert common.autocast(gpu, "bf16").fast_dtype == torch.bfloat16
        assert common.autocast(gpu, "fp16").fast_dtype == torch.float16


def test_fp16_step_scales_skips_overflow_and_round_trips():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prec = common.MixedPrecision("fp16", CPU)
    assert prec.scaler.is_enabled() and prec.scaler.get_scale() == 2.0 ** 16
    x = torch.randn(8, 4)
    ref = nn.Linear(4, 1)
    ref.load_state_dict(model.state_dict())
    prec.scaler.scale(model(x).pow(2).mean()).backward()  # the training loops' lines
    prec.scaler.unscale_(opt)
    nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    prec.scaler.step(opt)
    prec.scaler.update()
    ref_loss = ref(x).pow(2).mean()
    ref_loss.backward()
    with torch.no_grad():  # the scaled step equals the plain SGD step: scaling is undone before the update
        for p in ref.parameters():
            p -= 0.1 * p.grad
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    before = [p.detach().clone() for p in model.parameters()]
    # overflowing gradients: the step is skipped and the scale halved
    prec.scaler.scale(model(x).sum() * float("inf")).backward()
    prec.scaler.step(opt)
    prec.scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert prec.scaler.get_scale() == 2.0 ** 15
    other = common.MixedPrecision("fp16", CPU)
    other.load_state_dict(prec.state_dict())
    assert other.scaler.get_scale() == 2.0 ** 15
    assert common.MixedPrecision("bf16", CPU).state_dict() == {}  # bf16 needs no scaler


def _record_dtypes(monkeypatch, module, name):
    """Wrap module.name so every call records the dtype of its first tensor argument."""
    seen, fn = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        seen.append(args[0].dtype)
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return seen


@pytest.mark.parametrize("dtype", LOW)
def test_simclr_losses_are_float32_islands(dtype, monkeypatch):
    torch.manual_seed(0)
    z1, z2, y = torch.randn(8, 16), torch.randn(8, 16), torch.arange(8) % 4
    ref = [simclr_nscl.nt_xent_loss(z1, z2, 0.1), simclr_nscl.nscl_loss(z1, z2, y, 0.1)]
    seen = _record_dtypes(monkeypatch, simclr_nscl, "_contrast")  # S, the similarity matrix, is its first input
    with torch.autocast("cpu", dtype=dtype):
        got = [simclr_nscl.nt_xent_loss(z1, z2, 0.1), simclr_nscl.nscl_loss(z1, z2, y, 0.1)]
    assert seen == [torch.float32, torch.float32]
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW)
def test_resa_sinkhorn_and_loss_are_float32_islands(dtype, monkeypatch):
    torch.manual_seed(0)
    h, hb = torch.randn(8, 32), torch.randn(8, 32)
    z = [F.normalize(torch.randn(8, 16), dim=1) for _ in range(3)]
    zb = [F.normalize(torch.randn(8, 16), dim=1) for _ in range(2)]
    A_ref = resa.self_assignment(h, hb)
    ref = resa.resa_loss(z, zb, A_ref, 0.4)
    seen = _record_dtypes(monkeypatch, F, "cross_entropy")  # its input is Z_q Zbar_v^T / tau
    with torch.autocast("cpu", dtype=dtype):
        A = resa.self_assignment(h.to(dtype), hb.to(dtype))
        loss = resa.resa_loss([t.to(dtype) for t in z], [t.to(dtype) for t in zb], A, 0.4)
    assert A.dtype == torch.float32 and seen and set(seen) == {torch.float32}
    # the inputs were rounded to the low dtype, so compare with the float32 computation on those rounded inputs
    A_low = resa.self_assignment(h.to(dtype).float(), hb.to(dtype).float())
    torch.testing.assert_close(A, A_low, rtol=1e-6, atol=1e-7)
    ref_low = resa.resa_loss([t.to(dtype).float() for t in z], [t.to(dtype).float() for t in zb], A_low, 0.4)
    torch.testing.assert_close(loss, ref_low, rtol=1e-6, atol=1e-6)
    assert abs(float(loss) - float(ref)) < 0.05


@pytest.mark.parametrize("dtype", LOW)
def test_excb_centroids_balancing_and_loss_are_float32_islands(dtype):
    torch.manual_seed(0)
    layer = excb.CentroidLayer(16, 32)
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=dtype):
        z = layer(x.to(dtype))                                   # Eq. (1) under autocast
        p_t, z_b = excb.teacher_targets(z.view(2, 3, 32), torch.full((32,), 1 / 32))
        loss = excb.excb_loss(p_t, z.view(2, 3, 32), z.view(2, 3, 32))
    assert z.dtype == p_t.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(z, layer(x.to(dtype).float()), rtol=1e-6, atol=1e-6)


def test_excb_copies_each_view_to_the_device_before_concatenating(monkeypatch):
    target, seen = torch.device("meta"), []
    cat = torch.cat

    def recording_cat(tensors, *args, **kwargs):
        seen.append({t.device for t in tensors})
        return cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", recording_cat)
    views = [torch.randn(4, 3, 8, 8) for _ in range(2)]  # host tensors, as a DataLoader gives them
    x = excb.stack_views(views, target)
    assert x.device == target and x.shape == (8, 3, 8, 8)
    assert seen == [{target}]  # one concatenation, of tensors already on the device
    assert excb.stack_views([], target) is None


def test_features_are_float32_unless_bf16_is_asked_for():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 32))
    data = [(torch.randn(16, 12), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    x = torch.cat([b[0] for b in data])
    exact = model(x).detach()
    h, y = common.extract_features(model, data, CPU)
    assert h.dtype == torch.float32 and torch.equal(h, exact) and y.shape == (32,)
    h16, _ = common.extract_features(model, data, CPU, precision="bf16")
    assert h16.dtype == torch.float32 and not torch.equal(h16, exact)  # rounded through bf16
    torch.testing.assert_close(h16, exact, rtol=2e-2, atol=2e-2)
