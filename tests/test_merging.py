"""Token merging: rate 0 is the unreduced model exactly, r tokens fewer per block, one merge step and the whole
forward against slow references (bipartite matching, weighted average, proportional attention, size-weighted
pooling), growth, checkpoints and timm export, and the clear errors where merging cannot apply."""

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenformer_vision  # noqa: F401  (registers the models)
from tokenformer_vision import TokenFormerViT, checkpoint_filter_fn
from tokenformer_vision.export import load_exported, save_timm_weights
from tokenformer_vision.merging import merge_pairs

KW = dict(img_size=32, patch_size=4, depth=4, num_classes=5, embed_dim=48, num_heads=3)  # 64 patches + cls


def make(seed: int = 0, **kwargs) -> TokenFormerViT:
    torch.manual_seed(seed)
    return timm.create_model("tokenformer_tiny", **{**KW, **kwargs}).eval()


def images(n: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def slow_merge(x: torch.Tensor, keys: torch.Tensor, size: torch.Tensor, r: int, prefix: int):
    """One ToMe step for one image ``x [N, C]`` with Python loops: A = even patch positions, B = odd."""
    patches = list(range(prefix, x.shape[0]))
    A, B = patches[0::2], patches[1::2]
    cos = lambda i, j: float(F.cosine_similarity(keys[i].double(), keys[j].double(), dim=0))  # noqa: E731
    best = {a: max(B, key=lambda b: cos(a, b)) for a in A}
    merged_a = sorted(A, key=lambda a: -cos(a, best[a]))[:r]
    xs, ss = [], []
    for a in A:
        if a not in merged_a:
            xs.append(x[a])
            ss.append(size[a])
    for b in B:
        group = [b] + [a for a in merged_a if best[a] == b]
        total = sum(size[i] for i in group)
        xs.append(sum(size[i] * x[i] for i in group) / total)
        ss.append(total)
    return torch.cat([x[:prefix], torch.stack(xs)]), torch.cat([size[:prefix], torch.stack(ss)])


def slow_forward(model: TokenFormerViT, x: torch.Tensor) -> torch.Tensor:
    """The merged model one image at a time: explicit softmax(QKᵀ/√d + log s)V, keys' head mean, slow_merge,
    size-weighted average pooling."""
    p, r, out = model.num_prefix_tokens, model.merge_tokens, []
    for img in x:
        t = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
        s = torch.ones(t.shape[0], dtype=t.dtype)
        for blk in model.blocks:
            h, a = blk.norm1(t), blk.attn
            q, k, v = (f(h).view(len(h), a.num_heads, -1).transpose(0, 1) for f in (a.q, a.k, a.v))
            attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]) + s.log(), dim=-1)
            t = t + a.proj((attn @ v).transpose(0, 1).reshape(len(h), -1))
            t, s = slow_merge(t, k.mean(0), s, r, p)
            t = t + blk.ffn(blk.norm2(t))
        t = model.norm(t)
        pooled = t[0] if model.global_pool == "token" else (s[p:, None] * t[p:]).sum(0) / s[p:].sum()
        out.append(model.head(model.fc_norm(pooled)))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------- equivalences
def test_rate_zero_is_exactly_the_unreduced_model():
    plain, off = make(), make(merge_tokens=0)
    x = images()
    with torch.no_grad():
        want = plain.forward_head(plain.norm(plain.blocks[-1].forward_gated(
            torch.nn.Sequential(*plain.blocks[:-1])(plain.norm_pre(plain._pos_embed(plain.patch_embed(x)))))))
        assert torch.equal(plain(x), want) and torch.equal(off(x), want)
        off.merge_tokens = 8
        assert not torch.equal(off(x), want)
        off.merge_tokens = 0  # switched off again: bit-identical
        assert torch.equal(off(x), want)


@pytest.mark.parametrize("r,counts", [(8, [65, 57, 49, 41, 33]), (20, [65, 45, 25, 13, 7])])
def test_each_block_removes_r_tokens_at_most_half_its_patches(r, counts):
    model = make(merge_tokens=r)
    seen = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[1], o.shape[1])))
    with torch.no_grad():
        model(images(2))
    assert seen == list(zip(counts[:-1], counts[1:], strict=True))
    assert torch.equal(model.merging.size.sum(1), torch.full((2,), 65.0))  # every patch is accounted for once
    assert torch.equal(model.merging.size[:, 0], torch.ones(2))  # cls never merged


@pytest.mark.parametrize("prefix", [1, 3])
def test_one_merge_step_matches_a_slow_reference(prefix):
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(2, 21, 6, generator=g, dtype=torch.float64), torch.randn(2, 21, 4, generator=g)
    size = torch.randint(1, 5, (2, 21), generator=g).float()
    out, s = merge_pairs(x, keys, size, 5, prefix)
    assert out.shape == (2, 16, 6) and s.shape == (2, 16)
    for i in range(2):
        want_x, want_s = slow_merge(x[i], keys[i], size[i], 5, prefix)
        torch.testing.assert_close(out[i], want_x, rtol=0, atol=1e-12)
        assert torch.equal(s[i], want_s)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_merged_model_matches_a_slow_per_image_reference(pool):
    model = make(merge_tokens=12, global_pool=pool, dtype=torch.float64)
    x = images(3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), slow_forward(model, x), rtol=1e-6, atol=1e-8)  # fp32 normalisation


def test_merging_trains():
    model = make(merge_tokens=8).train()
    model(images(2)).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("blocks."))


# ------------------------------------------------------------------------------ growth, checkpoints, export
def test_growth_checkpoint_and_export_keep_merging(tmp_path):
    model = make(merge_tokens=10, dtype=torch.float64)
    x = images(2, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        model.grow(attn_tokens=64, ffn_tokens=256)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)  # growth stays function-preserving
    fresh = make(seed=1, merge_tokens=10, dtype=torch.float64)
    fresh.load_state_dict(checkpoint_filter_fn(model.state_dict(), fresh))
    with torch.no_grad():
        assert torch.equal(fresh(x), after)
    exported = make(merge_tokens=6)
    save_timm_weights(exported, tmp_path / "export")
    loaded = load_exported(tmp_path / "export")
    assert loaded.merge_tokens == 6  # model_args carry the rate given at construction
    with torch.no_grad():
        assert torch.equal(loaded(images()), exported.eval()(images()))


def test_copies_share_one_setting_and_carry_no_forward_state():
    model = make(merge_tokens=4)
    with torch.no_grad():
        model(images(1))
    twin = copy.deepcopy(model)
    assert twin.merging.size is None and all(b.merging is twin.merging for b in twin.blocks)
    twin.merge_tokens = 0
    assert model.merge_tokens == 4


# ------------------------------------------------------------------------------------------------- errors
def test_clear_errors_where_merging_cannot_apply():
    with pytest.raises(ValueError, match="does not combine with token routing"):
        make(merge_tokens=4, token_routing=True)
    routed = make(token_routing=True, routing_capacity=0.5)
    with pytest.raises(ValueError, match="does not combine with token routing"):
        routed.merge_tokens = 4
    routed.merge_tokens = 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="merge_tokens must be an int >= 0"):
            make(merge_tokens=bad)
    model = make(merge_tokens=4)
    with pytest.raises(ValueError, match="no patch grid"):
        model.forward_intermediates(images(1))
    final, inter = model.forward_intermediates(images(1), indices=(0, 3), output_fmt="NLC")
    assert [t.shape[1] for t in inter] == [60, 48] and final.shape[1] == 49  # NLC: the merged patch tokens
    features = make(merge_tokens=4, features_only=True, out_indices=(1, 3))
    with pytest.raises(ValueError, match="no patch grid"):
        features(images(1))
    with pytest.raises(ValueError, match="external attn_mask"):
        model(images(1), attn_mask=torch.zeros(1, 1, 65, 65))
    model.train().set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="grad checkpointing"):
        model(images(1))
