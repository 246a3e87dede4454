"""The fused Pattention kernel (tokenformer_vision.kernel) against the plain-autograd oracle (tests/reference.py):
values, gradients, the hand-derived backward (float64 gradcheck/gradgradcheck, clamped rows), zero rows, bf16
autocast, growth, dynamic τ, fused Q/K/V and its fallbacks, bad shapes and torch.compile without graph breaks."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from reference import pattention_reference

import tokenformer_vision  # noqa: F401  (registers the models)
from tokenformer_vision import Pattention
from tokenformer_vision import block as block_module
from tokenformer_vision.block import PattentionAttention, TokenFormerBlock
from tokenformer_vision.kernel import pattention_fused


def make_layer(d_in=24, d_out=16, n=40, dtype=torch.float32, std=1.0, **kwargs):
    """A layer with weights larger than the init, to exercise the GeLU."""
    torch.manual_seed(0)
    layer = Pattention(d_in, d_out, n, dtype=dtype, **kwargs)
    with torch.no_grad():
        layer.key_param.normal_(std=std)
        layer.value_param.normal_(std=std)
    return layer


def grads_of(layer, x, weight):
    """Output and (x, key, value) gradients of ``(layer(x) * weight).sum()``."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    (out * weight).sum().backward()
    return out.detach(), (x.grad, layer.key_param.grad, layer.value_param.grad)


def reference_grads_of(layer, x, weight, tau=None):
    """The same through the oracle, on copies of the layer's weights."""
    x = x.detach().clone().requires_grad_(True)
    key = layer.key_param.detach().clone().requires_grad_(True)
    value = layer.value_param.detach().clone().requires_grad_(True)
    out = pattention_reference(x, key, value, layer.scale() if tau is None else tau, layer.eps)
    (out * weight).sum().backward()
    return out.detach(), (x.grad, key.grad, value.grad)


def assert_rel_close(a, b, rel=1e-5):
    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    assert err <= rel, f"relative error {err:.3g} > {rel}"


@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24), (1, 1, 1, 24), (3, 1, 24)])
def test_forward_and_gradients_match_reference_fp32(shape):
    layer = make_layer()
    torch.manual_seed(1)
    x = torch.randn(*shape)
    weight = torch.randn(*shape[:-1], 16)
    out, grads = grads_of(layer, x, weight)
    out_r, grads_r = reference_grads_of(layer, x, weight)
    assert out.shape == out_r.shape == (*shape[:-1], 16)
    assert_rel_close(out, out_r)
    for g, gr in zip(grads, grads_r, strict=True):
        assert g.shape == gr.shape
        assert_rel_close(g, gr)
    with torch.no_grad():  # inference path (in-place GeLU, no autograd function)
        assert_rel_close(layer(x), out_r)
        (direct,) = pattention_fused(x, [layer.key_param], [layer.value_param], [layer.tau], layer.eps)
        assert_rel_close(direct, out_r)


def test_float64_matches_reference_to_roundoff():
    layer = make_layer(dtype=torch.float64)
    x = torch.randn(9, 24, dtype=torch.float64)
    weight = torch.randn(9, 16, dtype=torch.float64)
    out, grads = grads_of(layer, x, weight)
    out_r, grads_r = reference_grads_of(layer, x, weight)
    torch.testing.assert_close(out, out_r, rtol=1e-12, atol=1e-12)
    for g, gr in zip(grads, grads_r, strict=True):
        torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 3])
def test_gradcheck_fused_kernel_float64(groups):
    torch.manual_seed(0)
    n, d_in, d_out = 6, 5, 4
    x = torch.randn(4, d_in, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(n, d_in, dtype=torch.float64, requires_grad=True) for _ in range(groups)]
    params += [torch.randn(n, d_out + i, dtype=torch.float64, requires_grad=True) for i in range(groups)]
    taus = [torch.tensor(math.sqrt(n) * (1 + 0.5 * i), dtype=torch.float64) for i in range(groups)]

    def fn(x, *params):
        return tuple(pattention_fused(x, params[:groups], params[groups:], taus, 1e-6))

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))  # double backward differentiates the formula
    outs = fn(x, *params)
    for i, out in enumerate(outs):  # each group keeps its own τ and values
        torch.testing.assert_close(out, pattention_reference(x, params[i], params[groups + i], taus[i]),
                                   rtol=1e-12, atol=1e-12)


def test_gradcheck_clamped_rows():
    """A row whose scores have ‖A‖ < eps: the clamp is active and the norm term of the backward must vanish."""
    torch.manual_seed(0)
    eps = 1e-2
    key = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    value = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 5, dtype=torch.float64)
    x[2] *= 1e-4
    x.requires_grad_(True)
    with torch.no_grad():
        norms = torch.linalg.vector_norm(x @ key.t(), dim=-1)
    assert norms[2] < eps < norms[[0, 1, 3, 4]].min()  # the construction really clamps row 2 only

    def fn(x, key, value):
        return pattention_fused(x, [key], [value], [2.5], eps)[0]

    assert torch.autograd.gradcheck(fn, (x, key, value))
    assert torch.autograd.gradgradcheck(fn, (x, key, value))
    got = torch.autograd.grad(fn(x, key, value).square().sum(), (x, key, value))
    want = torch.autograd.grad(pattention_reference(x, key, value, 2.5, eps).square().sum(), (x, key, value))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_zero_rows_no_nan():
    layer = make_layer()
    x = torch.randn(4, 24)
    x[1] = 0.0
    out, grads = grads_of(layer, x, torch.ones(4, 16))
    out_r, grads_r = reference_grads_of(layer, x, torch.ones(4, 16))
    assert torch.equal(out[1], torch.zeros(16))
    for g in (out, *grads):
        assert torch.isfinite(g).all()
    for g, gr in zip(grads, grads_r, strict=True):
        assert_rel_close(g, gr)


def test_bf16_autocast_finite_close_and_like_reference():
    layer = make_layer(d_in=64, d_out=32, n=256, std=0.5)
    x = torch.randn(2, 8, 64)
    weight = torch.ones(2, 8, 32)
    exact, _ = reference_grads_of(layer, x, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = grads_of(layer, x, weight)
        out_r, grads_r = reference_grads_of(layer, x, weight)  # the oracle's products follow autocast too
    assert out.dtype == torch.bfloat16  # (the oracle casts its result back to x's dtype)
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    assert layer.key_param.grad.dtype == layer.value_param.grad.dtype == torch.float32  # master weights stay fp32
    assert_rel_close(out.float(), exact, rel=2e-2)
    assert_rel_close(out.float(), out_r, rel=2e-2)
    for g, gr in zip(grads, grads_r, strict=True):
        assert_rel_close(g.float(), gr.float(), rel=2e-2)


def test_growth_exact_through_the_kernel():
    layer = make_layer(dtype=torch.float64)
    x = torch.randn(6, 24, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        layer.grow(64)
        torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), reference_grads_of(layer, x, 1.0, tau=math.sqrt(40))[0],
                               rtol=1e-12, atol=1e-12)
    layer(x).sum().backward()
    assert layer.key_param.grad[40:].abs().sum() > 0  # the new zero keys learn


def test_dynamic_scale_matches_reference_after_growth():
    layer = make_layer(dynamic_scale=True)
    layer.grow(56)
    x = torch.randn(5, 24)
    out, grads = grads_of(layer, x, torch.ones(5, 16))
    out_r, grads_r = reference_grads_of(layer, x, torch.ones(5, 16), tau=math.sqrt(56))
    assert_rel_close(out, out_r)
    for g, gr in zip(grads, grads_r, strict=True):
        assert_rel_close(g, gr)


def _attention():
    torch.manual_seed(0)
    attn = PattentionAttention(32, 4, 24)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(std=0.5)
        attn.k.tau.fill_(3.0)  # distinct τ per projection: each keeps its own normalisation
    return attn


def attention_reference(attn, x):
    """The attention module written with the oracle, each projection on its own."""
    B, N, C = x.shape
    q, k, v = (pattention_reference(x, p.key_param, p.value_param, p.tau, p.eps).view(B, N, attn.num_heads, -1)
               .transpose(1, 2) for p in (attn.q, attn.k, attn.v))
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
    return pattention_reference(y, attn.proj.key_param, attn.proj.value_param, attn.proj.tau, attn.proj.eps)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Group counts G of every pattention_fused call made by the attention module."""
    calls = []

    def spy(x, keys, values, taus, eps):
        calls.append(len(keys))
        return pattention_fused(x, keys, values, taus, eps)

    monkeypatch.setattr(block_module, "pattention_fused", spy)
    return calls


def test_fused_qkv_matches_separate_layers(kernel_calls):
    attn = _attention()
    x = torch.randn(2, 9, 32)
    x_fused = x.clone().requires_grad_()
    y = attn(x_fused)
    assert kernel_calls == [3]  # one kernel call for Q, K and V
    y.square().sum().backward()
    grads_fused = [x_fused.grad, *(p.grad.clone() for p in attn.parameters())]
    attn.zero_grad(set_to_none=True)
    x_ref = x.clone().requires_grad_()
    y_ref = attention_reference(attn, x_ref)
    y_ref.square().sum().backward()
    assert_rel_close(y.detach(), y_ref.detach())
    for g, gr in zip(grads_fused, [x_ref.grad, *(p.grad for p in attn.parameters())], strict=True):
        assert_rel_close(g, gr)
    with torch.no_grad():
        for out, layer in zip(attn.qkv(x), (attn.q, attn.k, attn.v), strict=True):
            assert_rel_close(out, layer(x))


def test_fused_qkv_falls_back_with_hooks_or_unequal_tokens(kernel_calls):
    attn = _attention()
    x = torch.randn(1, 3, 32)
    seen = []
    handle = attn.k.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    attn(x)
    assert seen == [torch.Size([1, 3, 32])]  # the hook ran: k was called on its own
    assert 3 not in kernel_calls
    handle.remove()
    kernel_calls.clear()
    attn(x)
    assert kernel_calls == [3]
    attn.v.grow(30)
    kernel_calls.clear()
    with torch.no_grad():
        out = attn(x)
    assert 3 not in kernel_calls  # unequal token counts: one call per layer
    assert_rel_close(out, attention_reference(attn, x))
    attn.q.grow(30)
    attn.k.grow(30)
    kernel_calls.clear()
    attn(x)
    assert kernel_calls[0] == 3


def test_fused_rejects_bad_shapes():
    k, v = torch.randn(4, 6), torch.randn(4, 3)
    with pytest.raises(ValueError, match="last dimension 6"):
        pattention_fused(torch.randn(2, 5), [k], [v], [1.0], 1e-6)
    with pytest.raises(ValueError, match="every key"):
        pattention_fused(torch.randn(2, 6), [k, torch.randn(5, 6)], [v, v], [1.0, 1.0], 1e-6)
    with pytest.raises(ValueError, match="every key"):
        pattention_fused(torch.randn(2, 6), [k], [torch.randn(5, 3)], [1.0], 1e-6)
    with pytest.raises(ValueError, match="matching keys"):
        pattention_fused(torch.randn(2, 6), [k, k], [v], [1.0, 1.0], 1e-6)
    with pytest.raises(ValueError, match="matching keys"):
        pattention_fused(torch.randn(2, 6), [], [], [], 1e-6)
    with pytest.raises(ValueError, match="τ must not require grad"):
        pattention_fused(torch.randn(2, 6), [k], [v], [torch.tensor(2.0, requires_grad=True)], 1e-6)


def test_model_equals_reference_formula(monkeypatch):
    model = timm.create_model("tokenformer_tiny", img_size=32, depth=2, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(Pattention, "forward",
                        lambda self, x: pattention_reference(x, self.key_param, self.value_param, self.scale(),
                                                             self.eps))
    monkeypatch.setattr(PattentionAttention, "qkv", lambda self, x: [self.q(x), self.k(x), self.v(x)])
    ref = model(x)
    ref.square().sum().backward()
    assert_rel_close(out.detach(), ref.detach())
    for n, p in model.named_parameters():
        assert_rel_close(grads[n], p.grad, rel=2e-5)


def test_compiled_block_has_no_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = TokenFormerBlock(32, 2, attn_tokens=16, ffn_tokens=48)
    x = torch.randn(2, 5, 32, requires_grad=True)
    explain = torch._dynamo.explain(block)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in block.parameters())]
    x.grad = None
    block.zero_grad(set_to_none=True)
    y_ref = block(x)
    y_ref.square().sum().backward()
    assert_rel_close(y.detach(), y_ref.detach())
    for g, p in zip(grads, [x.grad, *(p.grad for p in block.parameters())], strict=True):
        assert_rel_close(g, p)
