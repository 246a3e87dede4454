"""The TokenFormer ViT backbone: presets, timm integration, exact growth, loading grown, old-layout and foreign
weights, bad input."""

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenformer_vision  # noqa: F401  (registers the models)
from tokenformer_vision import Pattention, TokenFormerViT, checkpoint_filter_fn
from tokenformer_vision.weights import token_counts

PRESETS = {
    # name: (d, depth, heads, n_attn, n_ffn)
    "tokenformer_tiny": (192, 12, 3, 192, 768),
    "tokenformer_small": (384, 12, 6, 384, 1536),
    "tokenformer_base": (768, 12, 12, 768, 3072),
    "tokenformer_large": (1024, 24, 16, 1024, 4096),
}


def small_model(**kwargs) -> TokenFormerViT:
    """A tokenformer_tiny-architecture model at 32² with 3 blocks: the same code paths, fast on CPU."""
    args = dict(img_size=32, patch_size=8, depth=3, num_classes=5)
    torch.manual_seed(0)
    return timm.create_model("tokenformer_tiny", **{**args, **kwargs})


def test_is_a_timm_vision_transformer():
    assert issubclass(TokenFormerViT, VisionTransformer)
    model = small_model()
    assert isinstance(model, VisionTransformer) and type(model) is TokenFormerViT


def test_models_are_registered():
    assert timm.list_models("tokenformer*") == sorted(PRESETS)
    assert timm.list_pretrained("tokenformer*") == []  # no public weights exist: no entry pretends otherwise
    for name in PRESETS:
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.input_size == (3, 224, 224) and cfg.num_classes == 1000


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_design_formula(name):
    d, depth, heads, n_attn, n_ffn = PRESETS[name]
    model = timm.create_model(name, device="meta")
    assert (model.embed_dim, len(model.blocks), model.attn_tokens, model.ffn_tokens) == (d, depth, n_attn, n_ffn)
    assert model.token_counts == {"attn_tokens": n_attn, "ffn_tokens": n_ffn}
    assert model.blocks[0].attn.num_heads == heads
    per_block = 4 * n_attn * (d + d) + n_ffn * (d + d)
    assert per_block == 16 * d * n_attn  # docs/design.md: 16·d·n_attn when n_ffn = 4·n_attn
    embed = 3 * 16 * 16 * d + d + d + 197 * d  # conv weight + bias, cls token, pos embed
    head = d * 1000 + 1000
    final_norm = 2 * d
    expected = depth * per_block + embed + head + final_norm
    assert sum(p.numel() for p in model.parameters()) == expected


def test_parameter_matched_base_equals_vit_base():
    ours = timm.create_model("tokenformer_base", attn_tokens=576, ffn_tokens=2304, device="meta")
    vit = timm.create_model("vit_base_patch16_224", device="meta")
    ours_blocks = sum(p.numel() for p in ours.blocks.parameters())
    vit_blocks_weights = sum(p.numel() for p in vit.blocks.parameters() if p.ndim == 2)  # bias/LN-free
    assert ours_blocks == vit_blocks_weights == 12 * 12 * 768 * 768


def test_every_projection_is_pattention():
    model = small_model()
    block = model.blocks[0]
    for layer in (block.attn.q, block.attn.k, block.attn.v, block.attn.proj, block.ffn):
        assert isinstance(layer, Pattention)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.blocks.modules())
    assert block.norm1.weight is None and block.norm2.weight is None  # no affine inside blocks
    assert model.norm.weight is not None  # final norm is a normal LayerNorm
    assert not hasattr(block, "mlp")
    assert any(k.startswith("blocks.0.ffn.") for k in model.state_dict())
    assert not any(".mlp." in k for k in model.state_dict())


def test_create_model_kwargs_and_forward_shapes():
    model = timm.create_model("tokenformer_tiny", num_classes=7, img_size=48, drop_path_rate=0.1,
                              attn_tokens=64, ffn_tokens=128)
    assert (model.attn_tokens, model.ffn_tokens, model.num_classes) == (64, 128, 7)
    out = model(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 7)
    feats = model.forward_features(torch.randn(1, 3, 48, 48))
    assert feats.shape == (1, 1 + 9, 192)
    assert model.forward_head(feats, pre_logits=True).shape == (1, 192)


def test_gradients_reach_every_parameter():
    model = small_model()
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def _logits_before_after_growth(dtype, **kwargs):
    model = timm.create_model("tokenformer_tiny", num_classes=10, **kwargs).to(dtype).eval()
    with torch.no_grad():  # trained-looking weights: larger than the init, so hidden states are not tiny
        for name, param in model.named_parameters():
            if "blocks" in name:
                param.mul_(5)
    x = torch.randn(2, 3, 224, 224, dtype=dtype)
    with torch.no_grad():
        before = model(x)
        model.grow(attn_tokens=256, ffn_tokens=1024)
        after = model(x)
    return model, before, after


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_whole_model_growth_is_exact(dtype, tol):
    model, before, after = _logits_before_after_growth(dtype)
    assert (model.attn_tokens, model.ffn_tokens) == (256, 1024)
    assert model.token_counts == {"attn_tokens": 256, "ffn_tokens": 1024}
    assert all(b.attn.proj.num_tokens == 256 and b.ffn.num_tokens == 1024 for b in model.blocks)
    assert (after - before).abs().max().item() <= tol


def test_whole_model_growth_with_official_dynamic_tau_changes_logits():
    """Control experiment: the same check fails with τ = sqrt(current n), so the exactness test can fail."""
    _, before, after = _logits_before_after_growth(torch.float64, dynamic_scale=True)
    assert (after - before).abs().max().item() > 1e-3


def test_new_tokens_receive_gradients_after_model_growth():
    model = small_model()
    model.grow(attn_tokens=256, ffn_tokens=1024)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for layer in (model.blocks[1].attn.q, model.blocks[1].ffn):
        n_old = 192 if layer is model.blocks[1].attn.q else 768
        assert layer.key_param.grad[n_old:].abs().sum() > 0
        assert layer.value_param.grad[n_old:].abs().sum() > 0


def test_grow_rejects_shrinking():
    model = small_model()
    with pytest.raises(ValueError, match="attn_tokens cannot shrink.*192.*100"):
        model.grow(attn_tokens=100)
    with pytest.raises(ValueError, match="ffn_tokens cannot shrink"):
        model.grow(ffn_tokens=10)
    with pytest.raises(ValueError, match="ffn_tokens cannot shrink"):
        model.grow(ffn_tokens=800.0)
    assert model.token_counts == {"attn_tokens": 192, "ffn_tokens": 768}  # a refused growth changes nothing


def test_grow_replaces_parameters_and_generator_makes_it_reproducible():
    a, b = small_model(), small_model()
    old = a.blocks[0].ffn.key_param
    a.grow(attn_tokens=200, ffn_tokens=800, generator=torch.Generator().manual_seed(3))
    b.grow(attn_tokens=200, ffn_tokens=800, generator=torch.Generator().manual_seed(3))
    assert a.blocks[0].ffn.key_param is not old
    assert old.shape == (768, 192)  # the old parameter object is left as it was
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    names = {n for n, _ in a.named_parameters()}
    assert names == {n for n, _ in small_model().named_parameters()}


def test_token_counts_recoverable_and_grown_weights_load_into_preset(tmp_path):
    model = small_model().eval()
    model.grow(attn_tokens=200, ffn_tokens=800)
    state = model.state_dict()
    assert token_counts(state) == {"attn_tokens": 200, "ffn_tokens": 800}
    lightning_style = {f"model.{k}": v for k, v in state.items()}
    assert token_counts(lightning_style) == {"attn_tokens": 200, "ffn_tokens": 800}
    assert token_counts({k: v for k, v in state.items() if not k.startswith("blocks.")}) is None
    assert token_counts(timm.create_model("vit_tiny_patch16_224", device="meta").state_dict()) is None

    path = tmp_path / "grown.pth"
    torch.save(state, path)
    loaded = timm.create_model("tokenformer_tiny", img_size=32, patch_size=8, depth=3, num_classes=5,
                               pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5)).eval()
    assert (loaded.attn_tokens, loaded.ffn_tokens) == (200, 800)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_loading_fewer_tokens_than_model_is_a_clear_error(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(small_model().state_dict(), path)
    with pytest.raises(ValueError, match="fewer parameter tokens.*attn_tokens: model 256, weights 192"):
        timm.create_model("tokenformer_tiny", img_size=32, patch_size=8, depth=3, num_classes=5, attn_tokens=256,
                          pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_first_release_mlp_keys_are_renamed_on_load(tmp_path):
    model = small_model().eval()
    model.grow(ffn_tokens=800)
    old_layout = {k.replace(".ffn.", ".mlp."): v for k, v in model.state_dict().items()}
    assert sum(".mlp." in k for k in old_layout) == 3 * 3  # key_param, value_param and τ of 3 blocks
    filtered = checkpoint_filter_fn(old_layout, small_model())
    assert not any(".mlp." in k for k in filtered)
    assert filtered.keys() == model.state_dict().keys()
    path = tmp_path / "old.pth"
    torch.save(old_layout, path)
    loaded = timm.create_model("tokenformer_tiny", img_size=32, patch_size=8, depth=3, num_classes=5,
                               pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5)).eval()
    assert loaded.ffn_tokens == 800
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("other,match", [(dict(depth=4), "depth: weights 3, model 4"),
                                         (dict(embed_dim=96), "embed_dim: weights 192, model 96")])
def test_weights_of_another_width_or_depth_are_a_clear_error(other, match):
    state = small_model().state_dict()
    with pytest.raises(ValueError, match=match):
        checkpoint_filter_fn(state, small_model(**other))


def test_pos_embed_resampled_on_load(tmp_path):
    path = tmp_path / "w.pth"
    source = small_model()
    torch.save(source.state_dict(), path)
    loaded = timm.create_model("tokenformer_tiny", img_size=48, patch_size=8, depth=3, num_classes=5,
                               pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert loaded.pos_embed.shape == (1, 1 + 36, 192)
    assert loaded(torch.randn(1, 3, 48, 48)).shape == (1, 5)


@pytest.mark.parametrize("size", [(32, 32), (37, 53), (17, 90)])
def test_dynamic_size_and_padding_at_odd_sizes(size):
    model = small_model(dynamic_img_size=True, dynamic_img_pad=True)
    x = torch.randn(2, 3, *size)
    assert model(x).shape == (2, 5)
    maps = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    grid = (-(-size[0] // 8), -(-size[1] // 8))
    assert [m.shape for m in maps] == [(2, 192, *grid)] * 2


def test_features_only_matches_feature_info():
    model = timm.create_model("tokenformer_tiny", features_only=True, out_indices=(1, 2), img_size=32, patch_size=8,
                              depth=3, dynamic_img_size=True)
    feats = model(torch.randn(1, 3, 40, 64))
    assert model.feature_info.channels() == [192, 192]
    assert model.feature_info.reduction() == [8, 8]
    assert [f.shape for f in feats] == [(1, 192, 5, 8)] * 2


def test_set_input_size_resamples_pos_embed():
    model = small_model()
    model.set_input_size(img_size=(48, 64))
    assert model.pos_embed.shape == (1, 1 + 6 * 8, 192)
    assert model(torch.randn(1, 3, 48, 64)).shape == (1, 5)


def test_grad_checkpointing_gives_same_outputs_and_grads():
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_pattention_patch_embed_and_head_options():
    model = small_model(pattention_embed=True, pattention_head=True, embed_tokens=64, head_tokens=32)
    assert isinstance(model.patch_embed.proj.pattention, Pattention)
    assert isinstance(model.head, Pattention) and model.head.num_tokens == 32
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    model.grow(attn_tokens=256)  # growth touches the blocks only
    assert model.patch_embed.proj.pattention.num_tokens == 64 and model.head.num_tokens == 32


def test_meta_and_dtype_construction():
    meta = timm.create_model("tokenformer_small", device="meta")
    assert all(p.is_meta for p in meta.parameters())
    double = small_model(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in double.parameters())
    assert double(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_global_pool_avg_follows_timm():
    model = small_model(global_pool="avg").eval()
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.fc_norm, torch.nn.LayerNorm)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        want = model.head(model.fc_norm(feats[:, model.num_prefix_tokens:].mean(1)))  # norm after pooling
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
        vit = VisionTransformer(img_size=32, patch_size=8, depth=3, embed_dim=192, num_heads=3, num_classes=5,
                                global_pool="avg")
        assert type(vit.norm) is type(model.norm) and type(vit.fc_norm) is type(model.fc_norm)


def test_bad_input_errors_name_the_problem():
    """Bad inputs get timm's own errors (PatchEmbed's size checks, the conv's channel check)."""
    model = small_model()
    with pytest.raises(RuntimeError, match="to have 3 channels, but got 1 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(AssertionError, match=r"Input height \(40\) doesn't match model \(32\)"):
        model(torch.randn(1, 3, 40, 32))
    with pytest.raises(AssertionError, match=r"Input width \(17\) doesn't match model \(32\)"):
        model(torch.randn(1, 3, 32, 17))
    with pytest.raises(ValueError, match="expected 4, got 3"):  # an unbatched image
        model(torch.randn(3, 32, 32))
    dynamic = small_model(dynamic_img_size=True)
    with pytest.raises(AssertionError, match=r"Input height \(33\) should be divisible by patch size \(8\)"):
        dynamic(torch.randn(1, 3, 33, 32))
    embedded = small_model(pattention_embed=True)
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        embedded(torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError):
        timm.create_model("tokenformer_tiny", not_a_real_kwarg=1)
    with pytest.raises(ValueError, match="divisible"):
        timm.create_model("tokenformer_tiny", num_heads=5)
