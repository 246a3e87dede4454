"""The fast Pattention kernels (tokenformer_vision.ops) against the slow reference path: values, gradients,
hand-derived backward (float64 gradcheck), zero rows, bf16 autocast, growth, dynamic τ, fused Q/K/V and
torch.compile without graph breaks."""

import math

import pytest
import timm
import torch

import tokenformer_vision  # noqa: F401  (registers the models)
from tokenformer_vision import Pattention, ops
from tokenformer_vision.layers import PattentionAttention, TokenFormerBlock
from tokenformer_vision.ops import _FusedPattention, _Normalize


def make_pair(d_in=24, d_out=16, n=40, dtype=torch.float32, std=1.0, **kwargs):
    """A fast layer and a reference layer with identical weights (larger than init, to exercise the GeLU)."""
    torch.manual_seed(0)
    fast = Pattention(d_in, d_out, n, dtype=dtype, fast=True, **kwargs)
    with torch.no_grad():
        fast.key_param.normal_(std=std)
        fast.value_param.normal_(std=std)
    ref = Pattention(d_in, d_out, n, dtype=dtype, fast=False, **kwargs)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def grads_of(layer, x, weight):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    (out * weight).sum().backward()
    return out.detach(), (x.grad, layer.key_param.grad, layer.value_param.grad)


def assert_rel_close(a, b, rel=1e-5):
    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    assert err <= rel, f"relative error {err:.3g} > {rel}"


def test_switches():
    layer = Pattention(4, 4, 4)
    assert ops.fast_path_enabled() and layer.uses_fast_path()
    with ops.fast_path(False):
        assert not layer.uses_fast_path()
        assert Pattention(4, 4, 4, fast=True).uses_fast_path()
    assert layer.uses_fast_path()
    with pytest.raises(TypeError, match="bool"):
        ops.set_fast_path(1)


@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24), (1, 1, 1, 24)])
def test_forward_and_gradients_match_reference_fp32(shape):
    fast, ref = make_pair()
    torch.manual_seed(1)
    x = torch.randn(*shape)
    weight = torch.randn(*shape[:-1], 16)
    out_f, grads_f = grads_of(fast, x, weight)
    out_r, grads_r = grads_of(ref, x, weight)
    assert out_f.shape == out_r.shape == (*shape[:-1], 16)
    assert_rel_close(out_f, out_r)
    for gf, gr in zip(grads_f, grads_r, strict=True):
        assert_rel_close(gf, gr)
    with torch.no_grad():  # inference path (in-place GeLU, no autograd function)
        assert_rel_close(fast(x), out_r)


def test_float64_matches_reference_to_roundoff():
    fast, ref = make_pair(dtype=torch.float64)
    x = torch.randn(9, 24, dtype=torch.float64)
    weight = torch.randn(9, 16, dtype=torch.float64)
    out_f, grads_f = grads_of(fast, x, weight)
    out_r, grads_r = grads_of(ref, x, weight)
    torch.testing.assert_close(out_f, out_r, rtol=1e-12, atol=1e-12)
    for gf, gr in zip(grads_f, grads_r, strict=True):
        torch.testing.assert_close(gf, gr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 3])
def test_gradcheck_custom_function_float64(groups):
    torch.manual_seed(0)
    n, d_in, d_out = 6, 5, 4
    x = torch.randn(4, d_in, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(n, d_in, dtype=torch.float64, requires_grad=True) for _ in range(groups)]
    params += [torch.randn(n, d_out, dtype=torch.float64, requires_grad=True) for _ in range(groups)]
    tau = torch.tensor([math.sqrt(n) * (1 + 0.5 * i) for i in range(groups)], dtype=torch.float64).view(-1, 1)

    def fn(x, *params):
        return _FusedPattention.apply(x, tau, 1e-6, groups, *params)

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))  # double backward re-derives from the reference


def test_gradcheck_normalize_and_clamped_rows():
    torch.manual_seed(0)
    scores = torch.randn(5, 7, dtype=torch.float64)
    scores[2] *= 1e-3  # ‖row‖ < eps: the clamp is active, the norm term must vanish
    scores.requires_grad_(True)
    fn = lambda s: _Normalize.apply(s, 2.5, 1e-2)
    assert torch.autograd.gradcheck(fn, (scores,))
    assert torch.autograd.gradgradcheck(fn, (scores,))
    ref = lambda s: torch.nn.functional.gelu(
        s * (2.5 / torch.linalg.vector_norm(s, dim=-1, keepdim=True).clamp_min(1e-2)))
    (g_fast,) = torch.autograd.grad(fn(scores).sum(), scores)
    (g_ref,) = torch.autograd.grad(ref(scores).sum(), scores)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-12, atol=1e-12)


def test_token_weights_fast_matches_reference():
    fast, ref = make_pair()
    x = torch.randn(3, 4, 24, requires_grad=True)
    w_f, w_r = fast.token_weights(x), ref.token_weights(x)
    assert_rel_close(w_f, w_r)
    (gf,) = torch.autograd.grad(w_f.square().sum(), x)
    (gr,) = torch.autograd.grad(w_r.square().sum(), x)
    assert_rel_close(gf, gr)


def test_zero_rows_no_nan():
    fast, ref = make_pair()
    x = torch.randn(4, 24)
    x[1] = 0.0
    out_f, grads_f = grads_of(fast, x, torch.ones(4, 16))
    out_r, grads_r = grads_of(ref, x, torch.ones(4, 16))
    assert torch.equal(out_f[1], torch.zeros(16))
    for g in (out_f, *grads_f):
        assert torch.isfinite(g).all()
    for gf, gr in zip(grads_f, grads_r, strict=True):
        assert_rel_close(gf, gr)


def test_bf16_autocast_finite_close_and_like_reference():
    fast, ref = make_pair(d_in=64, d_out=32, n=256, std=0.5)
    x = torch.randn(2, 8, 64)
    exact = ref(x)
    results = {}
    for name, layer in (("fast", fast), ("ref", ref)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = grads_of(layer, x, torch.ones(2, 8, 32))
        assert out.dtype == torch.bfloat16
        assert all(torch.isfinite(t).all() for t in (out, *grads))
        assert layer.key_param.grad.dtype == torch.float32  # master weights stay fp32
        results[name] = (out, grads)
    assert_rel_close(results["fast"][0].float(), exact, rel=2e-2)
    for gf, gr in zip(results["fast"][1], results["ref"][1], strict=True):
        assert_rel_close(gf.float(), gr.float(), rel=2e-2)


def test_growth_exact_through_fast_path():
    fast, _ = make_pair(dtype=torch.float64)
    x = torch.randn(6, 24, dtype=torch.float64)
    with torch.no_grad():  # a live pre-growth graph would pin the old parameter shape (reference path too)
        before = fast(x)
        fast.grow(64)
        torch.testing.assert_close(fast(x), before, rtol=1e-12, atol=1e-12)
    fast.key_param.grad = None
    fast(x).sum().backward()
    assert fast.key_param.grad[40:].abs().sum() > 0  # the new zero keys learn


def test_dynamic_scale_matches_reference_after_growth():
    fast, ref = make_pair(dynamic_scale=True)
    fast.grow(56)
    ref.grow(56)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(5, 24)
    out_f, grads_f = grads_of(fast, x, torch.ones(5, 16))
    out_r, grads_r = grads_of(ref, x, torch.ones(5, 16))
    assert_rel_close(out_f, out_r)
    for gf, gr in zip(grads_f, grads_r, strict=True):
        assert_rel_close(gf, gr)


def _attn_pair():
    torch.manual_seed(0)
    attn = PattentionAttention(32, 4, 24)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(std=0.5)
        attn.k.tau.fill_(3.0)  # distinct τ per projection: each keeps its own normalisation
    return attn


def test_fused_qkv_matches_separate_layers():
    attn = _attn_pair()
    x = torch.randn(2, 9, 32)
    assert attn.fuses_qkv()
    out_fused, grads_fused = x.clone().requires_grad_(), None
    y = attn(out_fused)
    y.square().sum().backward()
    grads_fused = [out_fused.grad, *(p.grad.clone() for p in attn.parameters())]
    attn.zero_grad(set_to_none=True)
    with ops.fast_path(False):
        assert not attn.fuses_qkv()
        x_ref = x.clone().requires_grad_()
        y_ref = attn(x_ref)
        y_ref.square().sum().backward()
    assert_rel_close(y.detach(), y_ref.detach())
    for gf, gr in zip(grads_fused, [x_ref.grad, *(p.grad for p in attn.parameters())], strict=True):
        assert_rel_close(gf, gr)


def test_fused_qkv_falls_back_with_hooks_or_unequal_tokens():
    attn = _attn_pair()
    seen = []
    handle = attn.k.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not attn.fuses_qkv()
    attn(torch.randn(1, 3, 32))
    assert seen == [torch.Size([1, 3, 32])]
    handle.remove()
    attn.v.grow(30)
    assert not attn.fuses_qkv()
    attn.q.grow(30)
    attn.k.grow(30)
    assert attn.fuses_qkv()


def test_fused_rejects_bad_shapes():
    k, v = torch.randn(4, 6), torch.randn(4, 3)
    with pytest.raises(ValueError, match="last dimension 6"):
        ops.pattention_fused(torch.randn(2, 5), [k], [v], [1.0], 1e-6)
    with pytest.raises(ValueError, match="every key"):
        ops.pattention_fused(torch.randn(2, 6), [k, torch.randn(5, 6)], [v, v], [1.0, 1.0], 1e-6)


def test_model_fast_equals_reference():
    model = timm.create_model("tokenformer_tiny", img_size=32, depth=2, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with ops.fast_path(False):
        ref = model(x)
        ref.square().sum().backward()
    assert_rel_close(out.detach(), ref.detach())
    for n, p in model.named_parameters():
        assert_rel_close(grads[n], p.grad, rel=2e-5)


def test_compiled_block_has_no_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = TokenFormerBlock(32, 2, 16, 48)
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
