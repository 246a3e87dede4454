"""Pattention against the formula's plain-autograd oracle (tests/reference.py), gradients, precision and growth."""

import math

import pytest
import torch
from reference import pattention_reference

from tokenformer_vision import Pattention


def make_layer(d_in=12, d_out=7, n=9, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    layer = Pattention(d_in, d_out, n, dtype=dtype, **kwargs)
    with torch.no_grad():  # larger weights than the init, so the non-linearity is exercised
        layer.key_param.normal_(std=1.0)
        layer.value_param.normal_(std=1.0)
    return layer


def reference64(x, layer, tau=None):
    """The oracle in float64 on the layer's weights (τ: the layer's own unless given)."""
    tau = layer.scale() if tau is None else tau
    tau = tau.double() if isinstance(tau, torch.Tensor) else tau
    return pattention_reference(x.double(), layer.key_param.double(), layer.value_param.double(), tau, layer.eps)


@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12), (1, 1, 1, 12)])
def test_forward_matches_reference(shape):
    layer = make_layer()
    x = torch.randn(*shape)
    expected = reference64(x, layer, math.sqrt(9))
    out = layer(x)
    assert out.shape == (*shape[:-1], 7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_float64_forward_is_exact():
    layer = make_layer(dtype=torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64)
    expected = reference64(x, layer, math.sqrt(9))
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    layer = make_layer(dtype=torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)

    def fn(inp, keys, values):
        return torch.func.functional_call(layer, {"key_param": keys, "value_param": values}, (inp,))

    keys = layer.key_param.detach().clone().requires_grad_()
    values = layer.value_param.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, keys, values))
    assert torch.autograd.gradgradcheck(fn, (x, keys, values))


def test_gradients_match_reference():
    layer = make_layer(dtype=torch.float64)
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    got = (x.grad.clone(), layer.key_param.grad.clone(), layer.value_param.grad.clone())
    x2 = x.detach().clone().requires_grad_()
    k2 = layer.key_param.detach().clone().requires_grad_()
    v2 = layer.value_param.detach().clone().requires_grad_()
    pattention_reference(x2, k2, v2, math.sqrt(9)).square().sum().backward()
    for a, b in zip(got, (x2.grad, k2.grad, v2.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bf16_autocast_is_finite_and_close():
    layer = make_layer(d_in=64, d_out=32, n=256)
    x = torch.randn(8, 64)
    exact = reference64(x, layer).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    rel = (out.float() - exact).norm() / exact.norm()
    assert rel < 2e-2, rel


def test_zero_row_gives_zero_output_and_finite_gradients():
    layer = make_layer()
    x = torch.randn(3, 12)
    x[1] = 0.0
    x.requires_grad_(True)
    out = layer(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(7))
    out.sum().backward()
    for grad in (x.grad, layer.key_param.grad, layer.value_param.grad):
        assert torch.isfinite(grad).all()


def test_tau_fixed_at_creation_and_dynamic_option():
    layer = make_layer()
    assert float(layer.tau) == pytest.approx(3.0)
    dynamic = make_layer(dynamic_scale=True)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), dynamic(x))  # same n: same function
    layer.grow(16)
    dynamic.grow(16)
    assert float(layer.tau) == pytest.approx(3.0)
    assert dynamic.scale() == pytest.approx(4.0)
    torch.testing.assert_close(dynamic(x).double(), reference64(x, dynamic, 4.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x).double(), reference64(x, layer, 3.0), rtol=1e-5, atol=1e-5)


def test_init_follows_official_recipe():
    torch.manual_seed(0)
    layer = Pattention(768, 768, 3072, value_std=2 / (12 * math.sqrt(768)))
    assert layer.key_param.std().item() == pytest.approx(0.02, rel=0.02)
    assert layer.value_param.std().item() == pytest.approx(0.0060, rel=0.03)
    assert not any(name.endswith("bias") for name, _ in layer.named_parameters())
    assert "num_tokens=3072" in repr(layer) and "in_features=768" in repr(layer)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_grow_is_function_preserving(dtype, tol):
    layer = make_layer(dtype=dtype)
    x = torch.randn(10, 12, dtype=dtype) * 4
    before = layer(x)
    old_k, old_v = layer.key_param.detach().clone(), layer.value_param.detach().clone()
    layer.grow(20)
    assert layer.num_tokens == 20
    assert layer.key_param.shape == (20, 12) and layer.value_param.shape == (20, 7)
    assert torch.equal(layer.key_param[:9], old_k) and torch.equal(layer.value_param[:9], old_v)
    assert torch.count_nonzero(layer.key_param[9:]) == 0
    assert torch.count_nonzero(layer.value_param[9:]) == layer.value_param[9:].numel()
    assert (layer(x) - before).abs().max().item() <= tol


def test_grow_replaces_parameter_objects_and_carries_pending_grads():
    layer = make_layer()
    old_key, old_value = layer.key_param, layer.value_param
    layer(torch.randn(4, 12)).square().sum().backward()  # a pending (accumulating) gradient
    grads = old_key.grad.clone(), old_value.grad.clone()
    layer.grow(12)
    for new, old, grad in ((layer.key_param, old_key, grads[0]), (layer.value_param, old_value, grads[1])):
        assert new is not old and isinstance(new, torch.nn.Parameter) and new.requires_grad
        assert torch.equal(new.grad[:9], grad)  # old rows keep their gradient ...
        assert torch.count_nonzero(new.grad[9:]) == 0 and new.grad.shape == new.shape  # ... the new rows are 0
    assert [p for _, p in layer.named_parameters()] == [layer.key_param, layer.value_param]
    frozen = make_layer()
    frozen.requires_grad_(False)
    frozen.grow(12)
    assert not frozen.key_param.requires_grad and frozen.key_param.grad is None


def test_grow_same_count_is_a_no_op_and_generator_is_deterministic():
    layer = make_layer()
    key = layer.key_param
    layer.grow(9)
    assert layer.key_param is key
    a, b = make_layer(), make_layer()
    a.grow(14, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the global RNG must not matter
    b.grow(14, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.value_param, b.value_param)
    c = make_layer()
    c.grow(14, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(c.value_param[9:], a.value_param[9:])


def test_grow_with_dynamic_scale_changes_the_function():
    """The official τ = sqrt(n) breaks preservation: proves the preservation test above can fail."""
    layer = make_layer(dynamic_scale=True)
    x = torch.randn(10, 12)
    before = layer(x)
    layer.grow(20)
    assert (layer(x) - before).abs().max().item() > 1e-2


def test_new_tokens_learn_after_growth():
    layer = make_layer()
    layer.grow(15)
    x = torch.randn(16, 12)
    target = torch.randn(16, 7)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    (layer(x) - target).square().mean().backward()
    # Zero keys score 0, GeLU(0) = 0: the new values get no gradient at first, but the keys do (GeLU'(0) = ½) ...
    assert layer.key_param.grad[9:].abs().sum() > 0
    opt.step()
    opt.zero_grad()
    (layer(x) - target).square().mean().backward()
    # ... and one step later the values learn too. Zero keys AND zero values would stay dead forever.
    assert layer.value_param.grad[9:].abs().sum() > 0
    assert layer.key_param.grad[9:].abs().sum() > 0


@pytest.mark.parametrize("bad", [5, 8, 9.5, "10", True])
def test_grow_rejects_shrinking_and_non_int(bad):
    layer = make_layer()
    with pytest.raises(ValueError, match="shrink|non-int"):
        layer.grow(bad)


def test_bad_constructor_and_input():
    with pytest.raises(ValueError, match="num_tokens"):
        Pattention(4, 4, 0)
    with pytest.raises(ValueError, match="in_features"):
        Pattention(0, 4, 4)
    layer = make_layer()
    with pytest.raises(ValueError, match="last dimension 12"):
        layer(torch.randn(2, 11))
