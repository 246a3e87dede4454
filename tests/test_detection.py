"""Detection backbone: timm feature paths, the simple feature pyramid, torchvision detectors, weights, growth."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.models.detection.anchor_utils import AnchorGenerator

import tokenformer_vision  # noqa: F401  (registers the timm models)
from tokenformer_vision.detection import (
    SimpleFeaturePyramid,
    ViTDetBackbone,
    create_backbone,
    fasterrcnn_tokenformer,
    maskrcnn_tokenformer,
    retinanet_tokenformer,
)
from tokenformer_vision.pattention import Pattention

SMALL = dict(min_size=128, max_size=192)  # the detectors' resize: keeps every test at a few hundred tokens
SHALLOW = dict(depth=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _images_and_targets(with_masks: bool = False):
    """Two non-square images of different sizes with boxes (and masks) inside them."""
    images = [torch.rand(3, 200, 260), torch.rand(3, 230, 190)]
    boxes = [torch.tensor([[10.0, 20.0, 100.0, 120.0]]), torch.tensor([[30.0, 40.0, 150.0, 170.0], [0, 0, 50, 60]])]
    targets = []
    for img, b in zip(images, boxes, strict=True):
        target = dict(boxes=b, labels=torch.arange(1, len(b) + 1))
        if with_masks:
            masks = torch.zeros(len(b), *img.shape[1:], dtype=torch.uint8)
            for m, (x0, y0, x1, y1) in zip(masks, b.long().tolist(), strict=True):
                m[y0:y1, x0:x1] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


def _pattentions(model: torch.nn.Module) -> list[tuple[str, Pattention]]:
    return [(n, m) for n, m in model.backbone.trunk.named_modules() if isinstance(m, Pattention)]


def _check_train_step(model: torch.nn.Module, with_masks: bool = False) -> dict[str, torch.Tensor]:
    images, targets = _images_and_targets(with_masks)
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    layers = _pattentions(model)
    assert len(layers) == 5 * len(model.backbone.trunk.blocks)  # q, k, v, proj, mlp per block
    for name, layer in layers:
        for param in (layer.key_param, layer.value_param):
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"
    return losses


def _check_eval(model: torch.nn.Module, expect_masks: bool = False) -> list[dict[str, torch.Tensor]]:
    images, _ = _images_and_targets()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det, img in zip(out, images, strict=True):
        n = len(det["boxes"])
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,) and det["scores"].shape == (n,)
        if n:  # boxes are mapped back to the original image size
            assert (det["boxes"][:, 2] <= img.shape[2] + 1e-3).all()
            assert (det["boxes"][:, 3] <= img.shape[1] + 1e-3).all()
        if expect_masks:
            assert det["masks"].shape == (n, 1, *img.shape[1:])
    return out


# ----------------------------------------------------------------------------------------- timm feature paths
@pytest.mark.parametrize("out_indices", [(2, 5, 11), (11,), (0, 7)])
def test_features_only_matches_feature_info_and_blockwise_reference(out_indices):
    feats = timm.create_model("tokenformer_tiny", features_only=True, out_indices=out_indices,
                              dynamic_img_size=True, dynamic_img_pad=True)
    # reference: the plain model run block by block on an explicitly zero-padded input (no dynamic padding)
    ref = timm.create_model("tokenformer_tiny", dynamic_img_size=True).eval()
    # features_only prunes the blocks after the last out index and the head: load the reference's shared part
    kept = feats.model.state_dict().keys()
    assert max(out_indices) < len(ref.blocks) and "head.weight" not in kept
    feats.model.load_state_dict({k: v for k, v in ref.state_dict().items() if k in kept}, strict=True)
    feats.eval()
    channels, reductions = feats.feature_info.channels(), feats.feature_info.reduction()
    assert channels == [192] * len(out_indices) and reductions == [16] * len(out_indices)
    for h, w in [(33, 100), (64, 48), (17, 31)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            maps = feats(x)
            xp = F.pad(x, (0, -w % 16, 0, -h % 16))
            tokens = ref._pos_embed(ref.patch_embed(xp))
            expected = []
            for i, blk in enumerate(ref.blocks):
                tokens = blk(tokens)
                if i in out_indices:
                    gh, gw = xp.shape[-2] // 16, xp.shape[-1] // 16
                    expected.append(tokens[:, 1:].reshape(2, gh, gw, -1).permute(0, 3, 1, 2))
        assert len(maps) == len(out_indices)
        for m, e, c, r in zip(maps, expected, channels, reductions, strict=True):
            assert m.shape == (2, c, math.ceil(h / r), math.ceil(w / r))
            torch.testing.assert_close(m, e, rtol=0, atol=1e-5)


def test_features_without_dynamic_pad_reject_ragged_sizes():
    feats = timm.create_model("tokenformer_tiny", features_only=True, out_indices=(11,), dynamic_img_size=True,
                              depth=12)
    assert feats(torch.randn(1, 3, 48, 80))[0].shape == (1, 192, 3, 5)
    with pytest.raises(AssertionError, match="divisible by patch size"):  # timm's PatchEmbed check
        feats(torch.randn(1, 3, 50, 80))


# ---------------------------------------------------------------------------------------------- the pyramid
def test_simple_feature_pyramid_against_manual_ops():
    pyr = SimpleFeaturePyramid(32, in_stride=16, out_channels=8).eval()
    for p in pyr.parameters():  # non-trivial norm affines, so a skipped norm would show
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 32, 5, 6)
    with torch.no_grad():
        out = pyr(x)

    def ln(t, norm):
        return F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)

    def tail(t, stage):
        _, conv1, n1, conv3, n3 = stage
        return ln(F.conv2d(ln(F.conv2d(t, conv1.weight), n1), conv3.weight, padding=1), n3)

    with torch.no_grad():
        up4 = pyr.stages[0][0]
        t4 = F.conv_transpose2d(x, up4[0].weight, up4[0].bias, stride=2)
        t4 = F.conv_transpose2d(F.gelu(ln(t4, up4[1])), up4[3].weight, up4[3].bias, stride=2)
        up2 = pyr.stages[1][0]
        expected = {
            "0": tail(t4, pyr.stages[0]),
            "1": tail(F.conv_transpose2d(x, up2.weight, up2.bias, stride=2), pyr.stages[1]),
            "2": tail(x, pyr.stages[2]),
            "3": tail(F.max_pool2d(x, 2), pyr.stages[3]),
        }
    assert list(out) == ["0", "1", "2", "3", "pool"] and pyr.strides == [4, 8, 16, 32, 64]
    for name, e in expected.items():
        torch.testing.assert_close(out[name], e, rtol=1e-5, atol=1e-5)
    assert out["0"].shape == (2, 8, 20, 24) and out["3"].shape == (2, 8, 2, 3)
    torch.testing.assert_close(out["pool"], out["3"][:, :, ::2, ::2], rtol=0, atol=0)


def test_pyramid_rejects_bad_layouts():
    with pytest.raises(ValueError, match="unsupported scale factors"):
        SimpleFeaturePyramid(32, scale_factors=(3.0,))
    with pytest.raises(ValueError, match="fine to coarse"):
        SimpleFeaturePyramid(32, scale_factors=(1.0, 2.0))
    with pytest.raises(ValueError, match="top_block"):
        SimpleFeaturePyramid(32, top_block="p6")
    with pytest.raises(ValueError, match="channels"):
        SimpleFeaturePyramid(32)(torch.randn(1, 16, 4, 4))


# ---------------------------------------------------------------------------------------------- detectors
def test_faster_rcnn_real_preset_forward_and_strides():
    model = fasterrcnn_tokenformer("tokenformer_tiny", num_classes=3, **SMALL)
    backbone = model.backbone
    assert isinstance(backbone, ViTDetBackbone) and len(backbone.trunk.blocks) == 12
    assert backbone.trunk.attn_tokens == 192 and backbone.trunk.ffn_tokens == 768
    assert list(model.transform.image_mean) == list(IMAGENET_DEFAULT_MEAN)
    assert list(model.transform.image_std) == list(IMAGENET_DEFAULT_STD)
    backbone.eval()
    with torch.no_grad():
        maps = backbone(torch.rand(1, 3, 128, 192))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    for (name, m), stride in zip(maps.items(), backbone.strides, strict=True):
        assert m.shape == (1, backbone.out_channels, 128 // stride, 192 // stride), name
    _check_eval(model)


def test_faster_rcnn_train_step_reaches_pattention_tokens():
    model = fasterrcnn_tokenformer("tokenformer_tiny", num_classes=3, backbone_kwargs=SHALLOW, **SMALL)
    losses = _check_train_step(model)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    out = _check_eval(model)
    assert all(len(d["boxes"]) > 0 for d in out)  # fresh 3-class head: scores ≈ 1/3 > box_score_thresh


def test_mask_rcnn_train_step_and_eval():
    model = maskrcnn_tokenformer("tokenformer_tiny", num_classes=3, backbone_kwargs=SHALLOW, **SMALL)
    losses = _check_train_step(model, with_masks=True)
    assert "loss_mask" in losses
    _check_eval(model, expect_masks=True)


def test_retinanet_train_step_and_levels():
    model = retinanet_tokenformer("tokenformer_tiny", num_classes=3, backbone_kwargs=SHALLOW, **SMALL)
    assert model.backbone.names == ["0", "1", "2", "p6", "p7"] and model.backbone.strides == [8, 16, 32, 64, 128]
    # torchvision's RetinaNet anchors: 32..512 with three octave scales, one row per level
    assert model.anchor_generator.sizes == tuple(
        (s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (32, 64, 128, 256, 512))
    _check_train_step(model)
    _check_eval(model)


def test_mismatched_anchor_generator_is_rejected():
    anchors = AnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),) * 2)
    with pytest.raises(ValueError, match="anchors for 2 feature maps but the backbone returns 5"):
        fasterrcnn_tokenformer("tokenformer_tiny", num_classes=3, backbone_kwargs=dict(depth=1),
                               rpn_anchor_generator=anchors)


def test_growth_inside_detector_preserves_outputs():
    model = fasterrcnn_tokenformer("tokenformer_tiny", num_classes=3, backbone_kwargs=SHALLOW,
                                   box_score_thresh=0.0, **SMALL).eval()
    images, _ = _images_and_targets()
    x = torch.rand(1, 3, 96, 160)
    with torch.no_grad():
        feats_before = model.backbone(x)
        before = model.double()([i.double() for i in images])
    model.backbone.trunk.grow(attn_tokens=256, ffn_tokens=1024)
    assert model.backbone.trunk.attn_tokens == 256 and model.backbone.trunk.ffn_tokens == 1024
    with torch.no_grad():
        after = model([i.double() for i in images])
        feats_after = model.float().backbone(x)
    # fp32 pyramid maps: equal up to the regrouped sums of the wider GEMMs
    for name in feats_before:
        torch.testing.assert_close(feats_after[name], feats_before[name], rtol=0, atol=1e-5)
    # final detections in float64, where round-off cannot flip NMS / top-k decisions between near-tied boxes
    for b, a in zip(before, after, strict=True):
        assert len(b["boxes"]) > 0
        torch.testing.assert_close(a["labels"], b["labels"], rtol=0, atol=0)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-9)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------- trainability, checkpointing
def test_trainable_layers_freeze_the_right_parameters():
    def trainable(n):
        backbone = create_backbone("tokenformer_tiny", trainable_layers=n, depth=3)
        return {k for k, p in backbone.trunk.named_parameters() if p.requires_grad}, backbone

    names, backbone = trainable(1)
    assert names and all(k.startswith(("blocks.2.", "norm.")) for k in names)
    assert "norm.weight" in names and "blocks.2.ffn.key_param" in names
    assert all(p.requires_grad for p in backbone.pyramid.parameters())
    backbone(torch.rand(1, 3, 64, 96))["0"].sum().backward()
    assert backbone.trunk.blocks[1].ffn.key_param.grad is None
    assert backbone.trunk.blocks[2].ffn.key_param.grad.abs().sum() > 0
    assert trainable(0)[0] == set()
    all_names, backbone = trainable(3)
    assert all_names == {k for k, _ in backbone.trunk.named_parameters()}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= all_names
    assert {"cls_token", "pos_embed"}.isdisjoint(trainable(2)[0])
    with pytest.raises(ValueError, match="trainable_layers"):
        trainable(4)


def test_grad_checkpointing_gives_the_same_gradients():
    plain = create_backbone("tokenformer_tiny", depth=2)
    ckpt = create_backbone("tokenformer_tiny", depth=2, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.trunk.grad_checkpointing and not plain.trunk.grad_checkpointing
    x = torch.rand(1, 3, 64, 96)
    for model in (plain, ckpt):
        sum(m.square().mean() for m in model(x).values()).backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_timm_vit_trunk_and_chosen_feature_index():
    backbone = create_backbone("vit_tiny_patch16_224", depth=3, feature_index=1, out_channels=64)
    assert len(backbone.trunk.blocks) == 2  # the block after the chosen one is pruned
    maps = backbone(torch.rand(1, 3, 64, 80))
    assert [tuple(m.shape) for m in maps.values()] == [(1, 64, 16, 20), (1, 64, 8, 10), (1, 64, 4, 5),
                                                       (1, 64, 2, 2), (1, 64, 1, 1)]


# -------------------------------------------------------------------------------------------------- weights
def _trained_classifier() -> torch.nn.Module:
    """A 'trained' 2-block classifier that was grown (so loading must grow the trunk) with live new keys."""
    src = timm.create_model("tokenformer_tiny", depth=2, num_classes=10, dynamic_img_size=True)
    src.grow(attn_tokens=224, ffn_tokens=800)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # zero grown keys would not show whether they were loaded
    return src.eval()


def _check_loaded(model: torch.nn.Module, src: torch.nn.Module) -> None:
    trunk = model.backbone.trunk
    assert trunk.attn_tokens == 224 and trunk.ffn_tokens == 800
    src_state = src.state_dict()
    for key, value in trunk.state_dict().items():
        torch.testing.assert_close(value, src_state[key], rtol=0, atol=0, msg=key)
    x = torch.rand(1, 3, 96, 160)  # not the 224² grid the pos_embed was saved at: resampled on the fly
    with torch.no_grad():
        expected = src.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(model.backbone.eval().forward_trunk(x), expected, rtol=0, atol=1e-6)


def test_load_from_lightning_checkpoint(tmp_path):
    src = _trained_classifier()
    state = {f"model.{k}": v for k, v in src.state_dict().items()}
    state["criterion.weight"] = torch.ones(10)  # other LightningModule attributes are ignored
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.6.6"}, path)
    model = fasterrcnn_tokenformer("tokenformer_tiny", num_classes=3, backbone_weights=path,
                                   backbone_kwargs=SHALLOW, **SMALL)
    _check_loaded(model, src)

    # with EMA weights in the checkpoint (ImageClassifier(ema_decay=...)), those are the ones loaded
    ema = _trained_classifier()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    state.update({f"ema.module.{k}": v for k, v in ema.state_dict().items()})
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120}, path)
    model = fasterrcnn_tokenformer("tokenformer_tiny", num_classes=3, backbone_weights=path,
                                   backbone_kwargs=SHALLOW, **SMALL)
    _check_loaded(model, ema)


def test_load_from_safetensors_and_pth(tmp_path):
    src = _trained_classifier()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save(src.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = maskrcnn_tokenformer("tokenformer_tiny", num_classes=3, backbone_weights=tmp_path / name,
                                     backbone_kwargs=SHALLOW, **SMALL)
        _check_loaded(model, src)


def test_bad_weights_raise_clear_errors(tmp_path):
    def build(weights, **kw):
        return create_backbone("tokenformer_tiny", backbone_weights=weights, **{**SHALLOW, **kw})

    narrow = timm.create_model("tokenformer_tiny", depth=2, embed_dim=96).state_dict()
    with pytest.raises(ValueError, match="embed_dim: weights 96, model 192"):
        build(narrow)
    deeper = timm.create_model("tokenformer_tiny", depth=3).state_dict()
    with pytest.raises(ValueError, match="depth: weights 3, model 2"):
        build(deeper)
    vit = timm.create_model("vit_tiny_patch16_224", depth=2).state_dict()
    with pytest.raises(ValueError, match="no TokenFormer block weights"):
        build(vit)
    fewer = timm.create_model("tokenformer_tiny", depth=2, attn_tokens=128).state_dict()
    with pytest.raises(ValueError, match="fewer parameter tokens"):
        build(fewer)
    src = timm.create_model("tokenformer_tiny", depth=2).state_dict()
    incomplete = {k: v for k, v in src.items() if k != "blocks.1.attn.v.value_param"}
    with pytest.raises(ValueError, match="1 missing keys.*blocks.1.attn.v.value_param"):
        build(incomplete)
    with pytest.raises(ValueError, match="shape mismatches.*patch_embed.proj.bias"):
        build({**src, "patch_embed.proj.bias": torch.zeros(100)})
    bad_pos = {**src, "pos_embed": torch.zeros(1, 1 + 10 * 14, 192)}  # a non-square grid cannot be resampled
    with pytest.raises(ValueError, match="non-square"):
        build(bad_pos)
    with pytest.raises(FileNotFoundError, match="not found"):
        build(tmp_path / "missing.ckpt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        build(tmp_path / "tensor.pth")
