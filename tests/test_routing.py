"""Token-selective routing: equivalences with the unrouted model, hard skipping vs a slow per-image reference,
gradients, growth, features_only, grad checkpointing, exact TLOps accounting, the Lightning callback."""

import copy
import math

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F

import tokenformer_vision  # noqa: F401  (registers the models)
from tokenformer_vision import TokenFormerViT, checkpoint_filter_fn
from tokenformer_vision.routing import (
    RoutingMetricsCallback,
    hard_routed_block,
    soft_routed_block,
    tlops_fraction,
    tlops_saving,
)

KW = dict(img_size=32, patch_size=8, depth=4, num_classes=5)  # 16 patches + cls = 17 tokens, d 192


def make(seed: int = 0, **kwargs) -> TokenFormerViT:
    torch.manual_seed(seed)
    return timm.create_model("tokenformer_tiny", **{**KW, **kwargs})


def routed_copy(base: TokenFormerViT, **kwargs) -> TokenFormerViT:
    """A routed model with ``base``'s weights (the gates keep their own init)."""
    model = make(seed=1, token_routing=True, **kwargs)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".router." in k for k in missing)
    return model


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def set_gates(model: TokenFormerViT, bias: float, weight_scale: float = 0.0) -> None:
    with torch.no_grad():
        for block in model.blocks[1:]:
            block.router.fc2.weight.mul_(weight_scale)
            block.router.fc2.bias.fill_(bias)


def test_routing_off_adds_nothing():
    plain, off = make(), make(token_routing=False)
    assert plain.state_dict().keys() == off.state_dict().keys()
    assert all(block.router is None for block in off.blocks)
    x = images()
    assert torch.equal(plain(x), off(x))


def test_parameter_overhead_is_the_gates_only():
    plain, routed = make(), make(token_routing=True)
    d, hidden = 192, 48
    per_gate = d * hidden + hidden + hidden + 1
    extra = sum(p.numel() for p in routed.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == (KW["depth"] - 1) * per_gate  # block 0 has no gate
    assert routed.blocks[0].router is None and all(b.router is not None for b in routed.blocks[1:])
    assert all(float(b.router.fc2.bias.detach()) == -1.0 for b in routed.blocks[1:])


def test_gates_forced_open_match_the_unrouted_model():
    base = make().eval()
    routed = routed_copy(base).eval()
    set_gates(routed, bias=-1e4)  # p = 0 exactly: keep-gate 1, nothing skipped
    x = images()
    assert torch.equal(routed(x), base(x))  # eval: bit-identical
    routed.train(), base.train()
    with torch.no_grad():
        assert torch.equal(routed(x), base(x))
    # with autograd on, the differentiable key bias runs PyTorch's math attention kernel: equal to round-off
    torch.testing.assert_close(routed(x), base(x), rtol=0, atol=2e-6)
    assert routed.routing_stats().tlops == 1.0


def slow_reference(model: TokenFormerViT, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode routed forward, one image at a time, kept tokens selected by boolean indexing (no padding)."""
    out = []
    for img in x:
        t = model._embed(img[None])[0]
        for block in model.blocks:
            if block.router is None:
                t = block(t[None])[0]
                continue
            z = block.router(t)
            p = torch.sigmoid(z)
            keep = 1 - p
            keep[0] = 1.0
            kept = p <= block.routing_threshold
            kept[0] = True
            s = t[kept]
            g = keep[kept].unsqueeze(-1)
            a = block.attn
            h = block.norm1(s)
            q, k, v = (y.view(len(s), a.num_heads, -1).transpose(0, 1) for y in (a.q(h), a.k(h), a.v(h)))
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + torch.log(keep[kept])
            att = (logits.softmax(-1) @ v).transpose(0, 1).reshape(len(s), -1)
            s = s + g * a.proj(att)
            s = s + g * block.mlp(block.norm2(s))
            t = t.clone()
            t[kept] = s
        out.append(model.forward_head(model.norm(t[None])))
    return torch.cat(out)


def test_hard_skipping_matches_a_slow_per_image_reference():
    model = make(token_routing=True).eval()
    with torch.no_grad():
        for i, block in enumerate(model.blocks[1:]):  # gates that actually vary over tokens
            block.router.fc2.weight.mul_(40.0)
            block.router.fc2.bias.fill_(0.3 * i - 0.3)
    model.routing_threshold = 0.45
    x = images(4)
    with torch.no_grad():
        got = model(x)
        stats = model.routing_stats()
        want = slow_reference(model, x)
    per_image = stats.processed[1:]
    assert (per_image < stats.tokens).any(), "the construction must skip some tokens"
    assert len(set(per_image.flatten().tolist())) > 1, "images must keep different numbers of tokens"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hard_skipping_equals_soft_path_with_binary_gates():
    model = make(token_routing=True).eval()
    block = model.blocks[2]
    x = torch.randn(3, 17, 192, generator=torch.Generator().manual_seed(3))
    processed = torch.rand(3, 17, generator=torch.Generator().manual_seed(4)) < 0.5
    processed[:, 0] = True
    processed[1] = True  # one image keeps everything, another almost nothing: padding differs per image
    processed[2, 1:] = False
    keep = processed.float()
    with torch.no_grad():
        soft = soft_routed_block(block, x, keep, torch.log(keep))
        hard = hard_routed_block(block, x, keep, torch.log(keep), processed)
    torch.testing.assert_close(hard, soft, rtol=1e-5, atol=1e-5)
    assert torch.equal(hard[~processed], x[~processed])  # skipped tokens pass through bit-exactly
    assert not torch.allclose(hard[processed], x[processed])


def test_threshold_one_skips_nothing_and_hard_equals_soft():
    model = make(token_routing=True, routing_threshold=1.0)
    x = images()
    with torch.no_grad():
        soft = model.train()(x)
        hard = model.eval()(x)
    torch.testing.assert_close(hard, soft, rtol=1e-5, atol=1e-5)
    assert model.routing_stats().tlops == 1.0


def test_gates_receive_gradients_and_penalty():
    model = make(token_routing=True, routing_loss_weight=0.5).train()
    out = model(images())
    penalty = model.routing_loss()
    keeps = torch.stack([b.last_keep[:, 1:].mean() for b in model.blocks[1:]]).mean()
    assert torch.allclose(penalty, 0.5 * keeps)
    (out.square().mean() + penalty).backward()
    for block in model.blocks[1:]:
        for p in block.router.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    model.zero_grad()
    model(images())
    model.routing_loss().backward()  # the penalty alone pushes the gates towards halting
    # d mean(1 − p)/dz = −p(1 − p) < 0: descending the penalty raises the halting bias
    assert all(float(b.router.fc2.bias.grad) < 0 for b in model.blocks[1:])
    copy.deepcopy(model)  # EMA copies: the recorded gates (with their graph) are not module state
    model.routing_loss_weight = 0.0
    model(images())
    assert float(model.routing_loss().detach()) == 0.0


def test_tlops_accounting_is_exact_on_a_constructed_case():
    model = make(token_routing=True, depth=5).eval()
    with torch.no_grad():  # constant gates: p = sigmoid(bias) for every token of a block
        for block, bias in zip(model.blocks[1:], (-2.0, 2.0, -2.0, 0.0), strict=True):
            block.router.fc2.weight.zero_()
            block.router.fc2.bias.fill_(bias)
    model.routing_threshold = 0.6  # p: 0.12, 0.88 (skip), 0.12, 0.5
    x = images(2)
    seen = {}
    model.blocks[2].register_forward_hook(lambda m, a, o: seen.update(inp=a[0], out=o))
    with torch.no_grad():
        model(x)
    stats = model.routing_stats()
    N = 17
    assert stats.processed.tolist() == [[N, N], [N, N], [1, 1], [N, N], [N, N]]
    want_blocks = [1.0, 1.0, 1 / N, 1.0, 1.0]
    assert stats.block_fractions.tolist() == pytest.approx(want_blocks, abs=1e-12)
    assert stats.tlops == pytest.approx((4 + 1 / N) / 5, abs=1e-12)
    alpha = (3 + 1 / N) / 4  # mean active fraction of the routed blocks
    assert stats.saving == pytest.approx(tlops_saving(alpha, 5), abs=1e-12)
    assert tlops_fraction(want_blocks) == pytest.approx(stats.tlops, abs=1e-12)
    assert torch.equal(seen["out"][:, 1:], seen["inp"][:, 1:])  # the skipped block leaves patch tokens untouched
    assert model.routing_depth_map().tolist() == [[5] + [4] * 16] * 2
    model.routing_threshold = 0.3  # now block 4 (p = 0.5) is skipped too
    with torch.no_grad():
        model(x)
    assert model.routing_stats().processed[:, 0].tolist() == [N, N, 1, N, 1]


def test_routing_after_growth_and_checkpoint_round_trip():
    model = make(token_routing=True, dtype=torch.float64).eval()
    set_gates(model, bias=0.0, weight_scale=30.0)
    model.routing_threshold = 0.5
    x = images().double()
    with torch.no_grad():
        before = model(x)
        processed = [b.last_processed.clone() for b in model.blocks[1:]]
    gates = {k: v.clone() for k, v in model.state_dict().items() if ".router." in k}
    model.grow(attn_tokens=256, ffn_tokens=1024)
    with torch.no_grad():
        after = model(x)
    assert all(torch.equal(a, b.last_processed) for a, b in zip(processed, model.blocks[1:], strict=True))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)  # growth stays function-preserving
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in gates.items())  # gates do not grow
    fresh = make(token_routing=True, dtype=torch.float64).eval()
    fresh.load_state_dict(checkpoint_filter_fn({f"model.{k}": v for k, v in model.state_dict().items()}, fresh))
    with torch.no_grad():
        assert torch.equal(fresh(x), after)


def test_features_only_and_forward_intermediates_route():
    model = make(token_routing=True, features_only=True, out_indices=(1, 3)).eval()
    backbone = model.model  # timm's FeatureGetterNet wraps the TokenFormerViT
    with torch.no_grad():
        for block in backbone.blocks[1:]:
            block.router.fc2.weight.mul_(40.0)
    x = images(2)
    with torch.no_grad():
        feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, 192, 4, 4)] * 2
    full = make(token_routing=True).eval()
    missing, unexpected = full.load_state_dict(backbone.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("head.", "norm.")) for k in missing)
    with torch.no_grad():
        final, inter = full.forward_intermediates(x, indices=(1, 3))
        assert full.routing_stats().tlops < 1.0  # tokens were skipped on this path too
        torch.testing.assert_close(full.forward_features(x), final, rtol=0, atol=1e-6)
        _, early = full.forward_intermediates(x, indices=(1,), stop_early=True)
    for a, b in zip(feats, inter, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert full.routing_stats().depth == 2  # stop_early: only blocks 0 and 1 ran and are counted


def test_grad_checkpointing_gives_the_same_outputs_and_gate_gradients():
    x = images()
    results = []
    for ckpt in (False, True):
        model = make(token_routing=True, routing_loss_weight=0.1).train()
        model.set_grad_checkpointing(ckpt)
        out = model(x)
        (out.square().mean() + model.routing_loss()).backward()
        results.append((out.detach(), [b.router.fc1.weight.grad.clone() for b in model.blocks[1:]]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_bad_routing_arguments_raise():
    with pytest.raises(ValueError, match="routing_threshold"):
        make(token_routing=True, routing_threshold=1.5)
    with pytest.raises(ValueError, match="routing_loss_weight"):
        make(token_routing=True, routing_loss_weight=-1.0)
    model = make(token_routing=True)
    with pytest.raises(ValueError, match="routing_threshold"):
        model.routing_threshold = -0.1
    with pytest.raises(RuntimeError, match="token_routing=True"):
        make().routing_stats()
    with pytest.raises(TypeError):
        make(token_routnig=True)


class _TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = make(token_routing=True, routing_loss_weight=0.01)
        with torch.no_grad():
            for block in self.model.blocks[1:]:
                block.router.fc2.weight.mul_(40.0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y) + self.model.routing_loss()

    def validation_step(self, batch, batch_idx):
        self.model(batch[0])

    def predict_step(self, batch, batch_idx):
        return {"logits": self.model(batch[0])}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: validation sees the gates built above


def test_metrics_callback_logs_exact_tlops_and_fills_predictions():
    data = torch.utils.data.TensorDataset(images(6), torch.arange(6) % 5)
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # batches of 4 and 2
    module = _TinyModule()
    callback = RoutingMetricsCallback()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback], num_sanity_val_steps=0)
    trainer.fit(module, loader, loader)
    module.eval()
    with torch.no_grad():  # reference: one forward over all 6 images
        module.model(data.tensors[0])
    want = module.model.routing_stats()
    assert 0.0 < want.tlops < 1.0
    logged = trainer.callback_metrics
    assert float(logged["val/tlops"]) == pytest.approx(want.tlops, abs=1e-6)
    for i, value in enumerate(want.block_fractions):
        assert float(logged[f"val/tlops_block{i}"]) == pytest.approx(float(value), abs=1e-6)
    assert "train/tlops" in logged and "train/routing_loss" in logged
    predictions = trainer.predict(module, loader)
    assert [tuple(p["tlops"].shape) for p in predictions] == [(4,), (2,)]
    torch.testing.assert_close(torch.cat([p["tlops"] for p in predictions]), want.per_image().float())
    assert callback.predict_stats.tlops == pytest.approx(want.tlops, abs=1e-9)


def test_image_classifier_routing_penalty_metrics_and_prediction_file(tmp_path, imagefolder):
    from tokenformer_vision import ImageClassifier, ImageFolderDataModule
    from tokenformer_vision.prediction import PredictionWriter

    def fit_loss(weight: float) -> tuple[float, L.Trainer, ImageClassifier]:
        torch.manual_seed(0)
        module = ImageClassifier("tokenformer_tiny", num_classes=3, img_size=32,
                                 model_kwargs=dict(patch_size=8, depth=3, token_routing=True,
                                                   routing_loss_weight=weight))
        dm = ImageFolderDataModule(imagefolder, img_size=32, model_name="tokenformer_tiny", batch_size=4,
                                   num_workers=0, rand_augment=False, persistent_workers=False, pin_memory=False)
        losses = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(float(outputs["loss"]))

        trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, accelerator="cpu",
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Record()],
                            default_root_dir=tmp_path)
        trainer.fit(module, dm)
        return losses[0], trainer, module

    base_loss, trainer, module = fit_loss(0.0)
    weighted_loss, _, _ = fit_loss(2.0)
    # the penalty λ·mean(1 − p) enters the training loss: same seed, data and weights, only λ differs
    assert 0.0 < weighted_loss - base_loss <= 2.0
    assert any(isinstance(c, RoutingMetricsCallback) for c in trainer.callbacks)  # added by the module
    assert 0.0 < float(trainer.callback_metrics["val/tlops"]) <= 1.0

    out = tmp_path / "preds.csv"
    dm = ImageFolderDataModule(imagefolder, img_size=32, model_name="tokenformer_tiny", batch_size=4, num_workers=0,
                               persistent_workers=False, pin_memory=False)
    predictor = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                          callbacks=[PredictionWriter(out)])
    predictor.predict(module, datamodule=dm)
    rows = out.read_text().splitlines()
    assert rows[0].endswith(",tlops") and len(rows) == 13
    assert all(0.0 < float(r.rsplit(",", 1)[1]) <= 1.0 for r in rows[1:])
