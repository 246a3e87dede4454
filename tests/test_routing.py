"""Token routing: equivalences with the unrouted model, the hard (gathered) path vs the training path and vs a slow
per-image reference, threshold and capacity routing, gradients and the routing loss, growth, checkpoints,
features_only, grad checkpointing, torch.compile, exact TLOps accounting and its logging by ImageClassifier."""

import copy
import math
from functools import partial

import lightning as L
import pytest
import timm
import torch
from torch import nn

import tokenformer_vision  # noqa: F401  (registers the models)
from tokenformer_vision import TokenFormerViT, checkpoint_filter_fn
from tokenformer_vision.routing import RoutingConfig, RoutingStats, check_fraction

KW = dict(img_size=32, patch_size=8, depth=4, num_classes=5)  # 16 patches + cls = 17 tokens, d 192
N = 17


def make(seed: int = 0, **kwargs) -> TokenFormerViT:
    torch.manual_seed(seed)
    return timm.create_model("tokenformer_tiny", **{**KW, **kwargs})


def routed_copy(base: TokenFormerViT, **kwargs) -> TokenFormerViT:
    """A routed model with ``base``'s weights (the routers keep their own init)."""
    model = make(seed=1, token_routing=True, **kwargs)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".router." in k for k in missing)
    return model


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def set_gates(model: TokenFormerViT, bias: float, weight_scale: float = 0.0) -> None:
    with torch.no_grad():
        for block in model.blocks[1:]:
            block.router.fc2.weight.mul_(weight_scale)
            block.router.fc2.bias.fill_(bias)


def varied_gates(model: TokenFormerViT) -> None:
    """Routers whose keep probabilities vary strongly over tokens and blocks."""
    with torch.no_grad():
        for i, block in enumerate(model.blocks[1:]):
            block.router.fc2.weight.mul_(40.0)
            block.router.fc2.bias.fill_(0.3 * i - 0.3)


def embed(model: TokenFormerViT, x: torch.Tensor) -> torch.Tensor:
    """timm's forward_features up to the blocks."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


def slow_reference(model: TokenFormerViT, x: torch.Tensor, choose) -> torch.Tensor:
    """The routed forward one image at a time: each routed block runs ``forward_gated`` on the chosen tokens alone
    (boolean indexing, no padding, no mask). ``choose(block, logits [N]) -> bool [N]``."""
    p = model.num_prefix_tokens
    out = []
    for img in x:
        t = embed(model, img[None])[0]
        for block in model.blocks:
            if block.router is None:
                t = block(t[None])[0]
                continue
            logits = block.router(t).squeeze(-1).float()
            logits[:p] = float("inf")
            chosen = choose(block, logits)
            t = t.clone()
            t[chosen] = block.forward_gated(t[chosen][None])[0]
        out.append(model.forward_head(model.norm(t[None])))
    return torch.cat(out)


def by_threshold(block, logits):
    return torch.sigmoid(logits) >= 1.0 - block.routing.threshold


def by_capacity(block, logits):
    p = block.routing.num_prefix_tokens
    k = p + math.ceil(block.routing.capacity * (len(logits) - p))
    chosen = torch.zeros(len(logits), dtype=torch.bool)
    chosen[logits.topk(k).indices] = True
    return chosen


class FixedRouter(nn.Module):
    """A router that returns given keep logits ``[B, N]``."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.to(x.dtype).unsqueeze(-1)


def merge_stats(a: RoutingStats, b: RoutingStats) -> RoutingStats:
    """The routing stats of both sets of images."""
    assert a.tokens == b.tokens and a.depth == b.depth
    return RoutingStats(torch.cat([a.processed, b.processed], 1), a.tokens)


# ----------------------------------------------------------------------------------------------- structure
def test_routing_off_adds_nothing():
    plain, off = make(), make(token_routing=False)
    assert plain.state_dict().keys() == off.state_dict().keys()
    assert all(block.router is None for block in off.blocks)
    x = images()
    assert torch.equal(plain(x), off(x))
    assert plain.routing_stats(strict=False) is None
    assert float(plain.routing_loss()) == 0.0


def test_parameter_overhead_is_the_routers_only():
    plain, routed = make(), make(token_routing=True)
    d, hidden = 192, 48
    per_router = d * hidden + hidden + hidden + 1  # timm Mlp: fc1 d -> d/4, fc2 d/4 -> 1 (the keep logit)
    extra = sum(p.numel() for p in routed.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == (KW["depth"] - 1) * per_router  # block 0 has no router
    assert routed.blocks[0].router is None and all(b.router is not None for b in routed.blocks[1:])
    assert all(isinstance(b.router, timm.layers.Mlp) for b in routed.blocks[1:])
    assert all(float(b.router.fc2.bias.detach()) == 1.0 for b in routed.blocks[1:])  # keep probability ≈ 0.73
    assert all(k.startswith(tuple(f"blocks.{i}.router.fc" for i in range(1, 4)))
               for k in set(routed.state_dict()) - set(plain.state_dict()))


# ---------------------------------------------------------------------------------- equal to the unrouted model
def test_gates_forced_open_match_the_unrouted_model():
    base = make().eval()
    routed = routed_copy(base).eval()
    set_gates(routed, bias=1e4)  # k = 1 exactly: nothing skipped
    x = images()
    assert torch.equal(routed(x), base(x))  # eval: the gathered path runs every token, bit-identical
    routed.train(), base.train()
    # training: the same block on every token, an all-zero attention mask and a gate of exactly 1
    torch.testing.assert_close(routed(x), base(x), rtol=0, atol=2e-6)
    assert routed.routing_stats().tlops == 1.0


@pytest.mark.parametrize("train", [False, True])
def test_threshold_one_skips_nothing(train):
    base = make().train(train)
    routed = routed_copy(base, routing_threshold=1.0).train(train)
    set_gates(routed, bias=-1e4)  # k = 0: processed anyway, since k ≥ 1 − 1 always holds
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(routed(x), base(x), rtol=0, atol=2e-6)
    assert routed.routing_stats().tlops == 1.0


@pytest.mark.parametrize("train", [False, True])
def test_capacity_one_is_exactly_the_unrouted_model(train):
    base = make().train(train)
    routed = routed_copy(base, routing_capacity=1.0).train(train)
    varied_gates(routed)
    x = images()
    assert torch.equal(routed(x), base(x))
    assert routed.routing_stats().tlops == 1.0


# ----------------------------------------------------------------------------------------- the hard path
def test_eval_gathered_block_equals_training_masked_block_with_the_same_decisions():
    model = make(token_routing=True)
    block = model.blocks[2]
    x = torch.randn(3, N, 192, generator=torch.Generator().manual_seed(3))
    logits = torch.randn(3, N, generator=torch.Generator().manual_seed(4)) * 3
    logits[1] = 5.0  # one image keeps everything, another only its cls token: padding differs per image
    logits[2, 1:] = -5.0
    block.router = FixedRouter(logits)
    with torch.no_grad():
        hard = block.eval()(x)
        processed = block.last_processed.clone()
        masked = block.train()(x)
    assert torch.equal(block.last_processed, processed)
    want = torch.sigmoid(logits) >= 0.5
    want[:, 0] = True  # the cls token is always processed
    assert torch.equal(processed, want)
    assert 1 < int(processed[0].sum()) < N and int(processed[2].sum()) == 1
    torch.testing.assert_close(hard, masked, rtol=1e-5, atol=1e-5)
    for out in (hard, masked):
        assert torch.equal(out[~processed], x[~processed])  # skipped tokens pass through bit-exactly
        assert not torch.allclose(out[processed], x[processed])
    with torch.no_grad():  # the processed tokens of image 0 alone, no padding
        alone = block.forward_gated(x[0, processed[0]][None])[0]
    torch.testing.assert_close(hard[0, processed[0]], alone, rtol=1e-5, atol=1e-5)


def test_model_eval_equals_train_mode_with_the_same_decisions():
    model = make(token_routing=True)
    varied_gates(model)
    model.routing_threshold = 0.45
    x = images(4)
    with torch.no_grad():
        hard = model.eval()(x)
        decisions = [b.last_processed.clone() for b in model.blocks[1:]]
        train = model.train()(x)
    assert all(torch.equal(a, b.last_processed) for a, b in zip(decisions, model.blocks[1:], strict=True))
    assert any((~d).any() for d in decisions), "the construction must skip some tokens"
    torch.testing.assert_close(hard, train, rtol=1e-5, atol=1e-5)


def test_an_images_routing_does_not_depend_on_its_batch():
    """Images that process every token share a batch with images that skip some (the padded length is N)."""
    model = make(token_routing=True).eval()
    with torch.no_grad():
        for block in model.blocks[1:]:
            block.router.fc2.weight.mul_(40.0)
    x = images(6)
    with torch.no_grad():
        batched = model(x)
        stats = model.routing_stats()
        singles, single_stats = [], []
        for img in x.split(1):
            singles.append(model(img))
            single_stats.append(model.routing_stats().processed)
    processed = torch.cat(single_stats, 1)
    assert ((processed[1:] == N).any(1) & (processed[1:] < N).any(1)).any(), "the construction needs such a block"
    assert torch.equal(stats.processed, processed)
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-5, atol=1e-5)


def test_threshold_routing_matches_a_slow_per_image_reference():
    model = make(token_routing=True).eval()
    varied_gates(model)
    model.routing_threshold = 0.45
    x = images(4)
    with torch.no_grad():
        got = model(x)
        stats = model.routing_stats()
        want = slow_reference(model, x, by_threshold)
    per_image = stats.processed[1:]
    assert (per_image < stats.tokens).any(), "the construction must skip some tokens"
    assert len(set(per_image.flatten().tolist())) > 1, "images must keep different numbers of tokens"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_capacity_half_processes_half_the_patches_and_matches_a_slow_reference(train):
    model = make(token_routing=True, routing_capacity=0.5).train(train)
    varied_gates(model)
    x = images(3)
    with torch.no_grad():
        got = model(x)
        want = slow_reference(model, x, by_capacity)
    stats = model.routing_stats()
    assert stats.processed.tolist() == [[N] * 3] + [[1 + 8] * 3] * 3  # cls + ceil(0.5 · 16) per routed block
    assert stats.tlops == pytest.approx((1 + 3 * 9 / N) / 4, abs=1e-12)
    assert all(bool(b.last_processed[:, 0].all()) for b in model.blocks[1:])  # the cls token always runs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    model.routing.capacity = 0.3  # the setting is shared by every block: ceil(0.3 · 16) = 5
    with torch.no_grad():
        model(x)
    assert model.routing_stats().processed[1:].unique().tolist() == [6]


# ---------------------------------------------------------------------------------------------- gradients
def test_routers_receive_gradients_and_penalty():
    model = make(token_routing=True, routing_loss_weight=0.5).train()
    out = model(images())
    penalty = model.routing_loss()
    fractions = torch.stack([b.last_processed[:, 1:].double().mean() for b in model.blocks[1:]])
    assert float(penalty.detach()) == pytest.approx(0.5 * float(fractions.mean()), abs=1e-6)  # hard fraction
    assert float(penalty.detach()) > 0
    (out.square().mean() + penalty).backward()
    for block in model.blocks[1:]:
        for p in block.router.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    model.zero_grad()
    model(images())
    model.routing_loss().backward()  # the penalty alone pushes the keep probabilities down
    # d k/d logit = k(1 − k) > 0: descending the penalty lowers the keep bias
    assert all(float(b.router.fc2.bias.grad) > 0 for b in model.blocks[1:])
    copy.deepcopy(model)  # EMA copies: the recorded keep probabilities (with their graph) are not module state
    model.routing.loss_weight = 0.0
    model(images())
    assert float(model.routing_loss().detach()) == 0.0


def test_task_gradient_reaches_the_router_through_skipped_tokens():
    """Straight-through: a router whose tokens are all skipped still learns from the task loss (average pooling:
    the patch tokens reach the logits directly, as skipped keys they reach no other token)."""
    model = make(token_routing=True, global_pool="avg").train()
    set_gates(model, bias=-5.0)  # k ≈ 0.007: every patch token skips every routed block
    out = model(images())
    assert model.routing_stats().processed[1:].unique().tolist() == [1]
    out.square().mean().backward()
    for block in model.blocks[1:]:
        assert block.router.fc2.bias.grad is not None and float(block.router.fc2.bias.grad.abs()) > 0


def test_routing_target_pulls_towards_the_target_fraction():
    model = make(token_routing=True, routing_target=0.6).train()
    assert model.routing.loss_weight == 2.0  # the default λ with a target
    alpha = (4 * 0.6 - 1) / 3  # per routed block: 4 blocks, block 0 always runs
    for bias, sign in ((1.0, 1.0), (-5.0, -1.0)):  # everything processed (above target), nothing (below)
        set_gates(model, bias=bias, weight_scale=1.0)
        model.zero_grad()
        model(images())
        loss = model.routing_loss()
        fractions = [float(b.last_processed[:, 1:].double().mean()) for b in model.blocks[1:]]
        assert fractions == [1.0] * 3 if sign > 0 else fractions == [0.0] * 3
        assert float(loss) == pytest.approx(2.0 * sum((f - alpha) ** 2 for f in fractions) / 3, abs=1e-6)
        loss.backward()
        for block in model.blocks[1:]:  # descending moves the keep bias towards the target
            assert sign * float(block.router.fc2.bias.grad) > 0



def test_target_is_annealed_from_one_over_the_training_steps():
    model = make(token_routing=True, routing_target=0.6)
    cfg = model.routing
    alpha = (4 * 0.6 - 1) / 3
    cfg.anneal_steps = 4
    assert [cfg.block_target(3) for cfg.step in (0, 1, 2, 4, 9)] == pytest.approx(
        [1.0, 1 - (1 - alpha) / 4, 1 - (1 - alpha) / 2, alpha, alpha])
    cfg.step = 0
    set_gates(model, bias=1.0, weight_scale=1.0)  # everything processed: exactly the step-0 target, no penalty
    model.train()(images())
    assert float(model.routing_loss().detach()) == 0.0
    assert cfg.step == 1  # advanced once per training step
    model(images())
    loss = model.routing_loss()
    assert float(loss.detach()) == pytest.approx(2.0 * (1 - (1 - (1 - alpha) / 4)) ** 2, abs=1e-6)
    with torch.no_grad():
        model.eval()(images())
    model.routing_loss()
    assert cfg.step == 2  # evaluation forwards do not advance the schedule
    cfg.anneal_steps = 0  # no annealing: the final target from the first step
    assert cfg.block_target(3) == pytest.approx(alpha)
    assert RoutingConfig().block_target(3) is None


@pytest.mark.parametrize("train", [False, True])
def test_per_block_minimum_keeps_each_images_highest_logit_tokens(train):
    model = make(token_routing=True).train(train)
    model.routing.min_fraction = 0.25  # 16 patches: at least 4 per image and block
    varied_gates(model)
    for block in model.blocks[1:]:
        with torch.no_grad():
            block.router.fc2.bias.sub_(8.0)  # almost every token is below the threshold
    x = images(4)
    with torch.set_grad_enabled(train):
        model(x)
    decisions = [b.last_processed for b in model.blocks[1:]]
    counts = torch.stack([d[:, 1:].sum(1) for d in decisions])
    assert int(counts.min()) == 4 and bool(torch.stack([d[:, 0] for d in decisions]).all())
    t = model.blocks[0](embed(model, x))
    for block, processed in zip(model.blocks[1:], decisions, strict=True):
        logits = block.router(t).squeeze(-1)[:, 1:]
        top = logits.topk(4, dim=1).indices + 1
        assert bool(processed.gather(1, top).all())  # the minimum is each image's highest logits
        forced = torch.zeros_like(processed[:, 1:]).scatter(1, top - 1, True)
        assert torch.equal(processed[:, 1:], (torch.sigmoid(logits) >= 0.5) | forced)
        t = block(t)
    model.routing.min_fraction = None
    with torch.no_grad():
        model(x)
    assert int(model.routing_stats().processed[1:].min()) < 5  # without it, fewer


def test_per_block_minimum_with_a_target_and_the_straight_through_gradient():
    """The penalty's gradient reaches every patch token's keep probability equally (straight-through over the
    hard fraction), the forced tokens of the minimum included, and never the prefix token."""
    model = make(token_routing=True, routing_target=0.6).train()
    model.routing.min_fraction = 0.5
    set_gates(model, bias=-5.0)  # below the threshold everywhere: the minimum alone decides
    x = images(2)
    model(x)
    assert all(int(c) == 8 for b in model.blocks[1:] for c in b.last_processed[:, 1:].sum(1))
    keeps = [b.last_keep for b in model.blocks[1:]]
    for k in keeps:
        k.retain_grad()
    loss = model.routing_loss()
    alpha = (4 * 0.6 - 1) / 3
    assert float(loss.detach()) == pytest.approx(2.0 * (0.5 - alpha) ** 2, abs=1e-6)
    loss.backward()
    for k in keeps:
        want = 2.0 * 2 * (0.5 - alpha) / (3 * 2 * 16)  # λ · 2(f − α) / (blocks · images · patches)
        assert torch.allclose(k.grad[:, 1:], torch.full_like(k.grad[:, 1:], want))
        assert float(k.grad[:, 0].abs().max()) == 0.0


def test_inference_runs_the_per_token_layers_on_the_processed_tokens_only():
    """The gathered path costs what it skips: the FFN sees exactly the batch's processed tokens (no padding to the
    image that keeps the most), and the outputs equal the slow per-image reference."""
    model = make(token_routing=True).eval()
    varied_gates(model)
    model.routing_threshold = 0.45
    rows: list[int] = []
    hooks = [b.ffn.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:-1].numel()))
             for b in model.blocks[1:]]
    x = images(4)
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    processed = [int(b.last_processed.sum()) for b in model.blocks[1:]]
    longest = [int(b.last_processed.sum(1).max()) for b in model.blocks[1:]]
    assert rows == processed
    assert any(p < 4 * k for p, k in zip(processed, longest, strict=True)), "counts must differ between images"
    with torch.no_grad():
        torch.testing.assert_close(out, slow_reference(model, x, by_threshold), rtol=1e-4, atol=1e-4)


def test_packed_block_equals_each_image_alone_whatever_the_attention_groups():
    block = make(token_routing=True).blocks[2].eval()
    x = torch.randn(5, N, 192, generator=torch.Generator().manual_seed(5))
    processed = torch.rand(5, N, generator=torch.Generator().manual_seed(6)) < 0.5
    processed[:, 0] = True
    processed[1] = True  # one image keeps everything, one only its cls token
    processed[3, 1:] = False
    counts = processed.sum(1)
    with torch.no_grad():
        outs = [block.forward_packed(x, processed, counts, groups=g) for g in (1, 2, 5, 8)]
        alone = [block.forward_gated(x[i, processed[i]][None])[0] for i in range(5)]
    for out in outs:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(out[~processed], x[~processed])  # skipped tokens pass through bit-exactly
        for i in range(5):
            torch.testing.assert_close(out[i, processed[i]], alone[i], rtol=1e-5, atol=1e-5)

def test_routing_options_are_checked():
    with pytest.raises(ValueError, match="min_fraction"):
        RoutingConfig(min_fraction=1.5)
    with pytest.raises(ValueError, match="anneal_steps"):
        RoutingConfig(anneal_steps=-1)
    with pytest.raises(ValueError, match="anneal_steps"):
        RoutingConfig(anneal_steps=2.5)

# -------------------------------------------------------------------------------------------- accounting
def test_tlops_accounting_is_exact_on_a_constructed_case():
    model = make(token_routing=True, depth=5).eval()
    with torch.no_grad():  # constant routers: k = sigmoid(bias) for every token of a block
        for block, bias in zip(model.blocks[1:], (2.0, -2.0, 2.0, 0.0), strict=True):
            block.router.fc2.weight.zero_()
            block.router.fc2.bias.fill_(bias)
    model.routing_threshold = 0.6  # processed iff k ≥ 0.4; k: 0.88, 0.12 (skip), 0.88, 0.5
    x = images(2)
    seen = {}
    model.blocks[2].register_forward_hook(lambda m, a, o: seen.update(inp=a[0], out=o))
    with torch.no_grad():
        model(x)
    stats = model.routing_stats()
    assert isinstance(stats, RoutingStats)
    assert stats.processed.tolist() == [[N, N], [N, N], [1, 1], [N, N], [N, N]]
    want_blocks = [1.0, 1.0, 1 / N, 1.0, 1.0]
    assert stats.block_fractions.tolist() == pytest.approx(want_blocks, abs=1e-12)
    assert stats.tlops == pytest.approx((4 + 1 / N) / 5, abs=1e-12)
    assert stats.per_image().tolist() == pytest.approx([stats.tlops] * 2, abs=1e-12)
    alpha = (3 + 1 / N) / 4  # mean processed fraction of the L - 1 = 4 routed blocks
    assert stats.saving == pytest.approx(1 - (1 + 4 * alpha) / 5, abs=1e-12)  # the paper's TLOps saving
    assert sum(want_blocks) / 5 == pytest.approx(stats.tlops, abs=1e-12)
    assert torch.equal(seen["out"][:, 1:], seen["inp"][:, 1:])  # the skipped block leaves patch tokens untouched
    assert model.routing_depth_map().tolist() == [[5] + [4] * 16] * 2
    model.routing_threshold = 0.3  # processed iff k ≥ 0.7: now block 4 (k = 0.5) is skipped too
    with torch.no_grad():
        model(x)
    assert model.routing_stats().processed[:, 0].tolist() == [N, N, 1, N, 1]
    merged = merge_stats(stats, model.routing_stats())
    assert merged.processed.shape == (5, 4) and merged.tlops == pytest.approx((2 * (4 + 1 / N) + 2 * (3 + 2 / N))
                                                                               / 20, abs=1e-12)


def test_check_fraction():
    assert check_fraction("x", 0) == 0.0 and check_fraction("x", None, allow_none=True) is None
    for bad in (-0.1, 1.5, True, "0.5", None):
        with pytest.raises(ValueError, match=r"x must be a number in \[0, 1\]"):
            check_fraction("x", bad)


# ------------------------------------------------------------------------------- growth and checkpoints
@pytest.mark.parametrize("routing", [dict(routing_threshold=0.5), dict(routing_capacity=0.5)])
def test_routing_after_growth_and_checkpoint_round_trip(routing):
    model = make(token_routing=True, dtype=torch.float64, **routing).eval()
    set_gates(model, bias=0.0, weight_scale=30.0)
    x = images().double()
    with torch.no_grad():
        before = model(x)
        processed = [b.last_processed.clone() for b in model.blocks[1:]]
    assert any((~p).any() for p in processed)
    routers = {k: v.clone() for k, v in model.state_dict().items() if ".router." in k}
    model.grow(attn_tokens=256, ffn_tokens=1024)
    with torch.no_grad():
        after = model(x)
    assert all(torch.equal(a, b.last_processed) for a, b in zip(processed, model.blocks[1:], strict=True))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)  # growth stays function-preserving
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in routers.items())  # routers do not grow
    fresh = make(token_routing=True, dtype=torch.float64, **routing).eval()
    fresh.load_state_dict(checkpoint_filter_fn(model.state_dict(), fresh))
    assert fresh.token_counts == {"attn_tokens": 256, "ffn_tokens": 1024}
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


def test_grad_checkpointing_gives_the_same_outputs_and_router_gradients():
    x = images()
    results = []
    for ckpt in (False, True):
        model = make(token_routing=True, routing_loss_weight=0.1).train()
        varied_gates(model)
        model.set_grad_checkpointing(ckpt)
        out = model(x)
        (out.square().mean() + model.routing_loss()).backward()
        results.append((out.detach(), [b.router.fc1.weight.grad.clone() for b in model.blocks[1:]]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_capacity_routing_compiles_without_graph_breaks_and_matches_eager(mode):
    torch._dynamo.reset()
    model = make(token_routing=True, routing_capacity=0.5, depth=3).train(mode == "training")
    varied_gates(model)
    x = images(2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break is an error
    with torch.set_grad_enabled(mode == "training"):
        y = compiled(x)
        stats = model.routing_stats()
        y_ref = model(x)
    assert torch.equal(stats.processed, model.routing_stats().processed)
    assert stats.processed[1:].unique().tolist() == [9]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    if mode == "training":
        y.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        y_ref.square().sum().backward()
        for g, p in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_bad_routing_arguments_raise():
    with pytest.raises(ValueError, match=r"routing_threshold must be a number in \[0, 1\]"):
        make(token_routing=True, routing_threshold=1.5)
    with pytest.raises(ValueError, match=r"routing_capacity must be a number in \[0, 1\]"):
        make(token_routing=True, routing_capacity=2.0)
    with pytest.raises(ValueError, match=r"routing_target must be a number in \[0, 1\]"):
        make(token_routing=True, routing_target=-0.5)
    with pytest.raises(ValueError, match="routing_loss_weight"):
        make(token_routing=True, routing_loss_weight=-1.0)
    model = make(token_routing=True)
    with pytest.raises(ValueError, match=r"routing_threshold must be a number in \[0, 1\]"):
        model.routing_threshold = -0.1
    assert model.routing_threshold == 0.5
    model.routing_threshold = 0.25
    assert model.routing_threshold == 0.25 and all(b.routing.threshold == 0.25 for b in model.blocks[1:])
    with pytest.raises(ValueError, match="token_routing"):
        make().routing_threshold = 0.3
    with pytest.raises(RuntimeError, match="token_routing=True"):
        make().routing_stats()
    with pytest.raises(RuntimeError, match="token_routing=True"):
        model.routing_stats()  # no forward yet
    assert model.routing_stats(strict=False) is None
    with pytest.raises(ValueError, match="attn_mask"):
        model.blocks[1](torch.randn(1, N, 192), attn_mask=torch.ones(N, N, dtype=torch.bool))
    with pytest.raises(TypeError):
        make(token_routnig=True)


# --------------------------------------------------------------------------------------------- Lightning
def test_image_classifier_logs_exact_tlops_and_per_image_predictions():
    from tokenformer_vision.classifier import ImageClassifier

    data = torch.utils.data.TensorDataset(images(6), torch.arange(6) % 5)
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # batches of 4 and 2
    module = ImageClassifier("tokenformer_tiny", num_classes=5, img_size=32,
                             model_kwargs=dict(patch_size=8, depth=4, token_routing=True, routing_loss_weight=0.01),
                             optimizer=partial(torch.optim.SGD, lr=0.0))  # lr 0: validation sees these routers
    with torch.no_grad():
        for block in module.model.blocks[1:]:
            block.router.fc2.weight.mul_(40.0)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, loader, loader)
    module.eval()
    want = None
    with torch.no_grad():  # reference: each image on its own
        for img in data.tensors[0].split(1):
            module.model(img)
            want = module.model.routing_stats() if want is None else merge_stats(want, module.model.routing_stats())
    assert 0.0 < want.tlops < 1.0
    logged = trainer.callback_metrics
    assert float(logged["val/tlops"]) == pytest.approx(want.tlops, abs=1e-6)
    assert float(logged["val/tlops_saving"]) == pytest.approx(want.saving, abs=1e-6)
    for i, value in enumerate(want.block_fractions):
        assert float(logged[f"val/tlops_block{i}"]) == pytest.approx(float(value), abs=1e-6)
    assert 0.0 < float(logged["train/tlops"]) <= 1.0 and float(logged["train/routing_loss"]) > 0.0
    predictions = trainer.predict(module, loader)
    assert [tuple(p["tlops"].shape) for p in predictions] == [(4,), (2,)]
    torch.testing.assert_close(torch.cat([p["tlops"] for p in predictions]), want.per_image().float())


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
    # the penalty λ·(fraction processed) enters the training loss: same seed, data and weights, only λ differs
    assert 0.0 < weighted_loss - base_loss <= 2.0 + 1e-5
    assert float(trainer.callback_metrics["train/routing_loss"]) == 0.0  # λ = 0
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
