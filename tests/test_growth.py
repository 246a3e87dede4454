"""Torch-level growth: model, optimizer state, EMA copy, schedule validation (no Lightning Trainer)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.utils import ModelEmaV3

from tokenformer_vision import GrowthCallback, TokenFormerViT
from tokenformer_vision.callbacks import validate_schedule
from tokenformer_vision.growth import (
    grow_ema,
    grow_model,
    grow_optimizer,
    grow_param_state,
    grow_training_state,
)


def tiny(**kw) -> TokenFormerViT:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, attn_tokens=8, ffn_tokens=16,
                num_classes=5)
    return TokenFormerViT(**{**args, **kw})


def train_steps(model, optimizer, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        y = torch.randint(0, 5, (4,), generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def snapshot(optimizer):
    return {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for g in optimizer.param_groups
            for p in g["params"]}


def test_grow_model_reports_every_grown_parameter():
    torch.manual_seed(0)
    model = tiny()
    before = {n: p for n, p in model.named_parameters()}
    grown = grow_model(model, attn_tokens=12, ffn_tokens=20)
    names = {g.name for g in grown}
    layers = ("attn.q", "attn.k", "attn.v", "attn.proj", "ffn")
    expected = {f"blocks.{b}.{layer}.{kind}" for b in range(2) for layer in layers
                for kind in ("key_param", "value_param")}
    assert names == expected
    after = dict(model.named_parameters())
    for g in grown:
        assert g.new is after[g.name] and g.old is before[g.name]
        assert g.new is not g.old  # new objects: autograd and DDP hold the old shapes
        assert g.old_rows == (16 if g.name.startswith(("blocks.0.ffn", "blocks.1.ffn")) else 8)
        assert g.new_rows == (20 if ".ffn." in g.name else 12)
    # parameters that did not grow keep their objects
    for name, p in after.items():
        if name not in names:
            assert p is before[name]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_growth_preserves_function(dtype, tol):
    torch.manual_seed(0)
    model = tiny().to(dtype)
    with torch.no_grad():  # bigger weights give hidden states well away from zero (a harder check)
        for p in model.parameters():
            p.mul_(3.0)
    model.eval()
    x = torch.randn(3, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
        grow_model(model, attn_tokens=24, ffn_tokens=64, seed=1)
        out = model(x)
    assert model.attn_tokens == 24 and model.ffn_tokens == 64
    assert ref.abs().max() > 0.1
    assert (out - ref).abs().max().item() <= tol


def test_seeded_growth_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    a = tiny()
    b = copy.deepcopy(a)
    torch.manual_seed(123)
    grow_model(a, attn_tokens=10, ffn_tokens=24, seed=7)
    after_a = torch.rand(3)
    torch.manual_seed(123)
    grow_model(b, attn_tokens=10, ffn_tokens=24, seed=7)
    after_b = torch.rand(3)
    torch.manual_seed(123)
    untouched = torch.rand(3)
    assert torch.equal(after_a, untouched) and torch.equal(after_b, untouched)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    value = a.blocks[0].ffn.value_param[16:]
    assert value.abs().min() > 0  # random, not zero: zero keys AND zero values would never learn
    std = a.blocks[0].ffn.value_std
    assert 0.3 * std < value.std().item() < 3 * std
    assert torch.count_nonzero(a.blocks[0].ffn.key_param[16:]) == 0


def test_adamw_state_grows_rows_and_keeps_old_ones():
    torch.manual_seed(0)
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    train_steps(model, opt)
    old_state = snapshot(opt)
    grown = grow_training_state(model, attn_tokens=12, ffn_tokens=24, optimizer=opt, seed=0)
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    assert [id(p) for p in opt_params] == [id(p) for p in model.parameters()]
    by_new = {id(g.new): g for g in grown}
    for p in opt_params:
        state = opt.state[p]
        g = by_new.get(id(p))
        old = old_state[id(g.old) if g else id(p)]
        assert torch.equal(state["step"], old["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].shape == p.shape
            rows = g.old_rows if g else p.shape[0]
            assert torch.equal(state[key][:rows], old[key])
        if g:
            assert torch.count_nonzero(state["exp_avg"][g.old_rows:]) == 0
            expect = old["exp_avg_sq"].mean(dim=0, keepdim=True).expand(g.new_rows - g.old_rows, -1)
            torch.testing.assert_close(state["exp_avg_sq"][g.old_rows:], expect, rtol=0, atol=0)

    # The next step uses the carried state: compare one grown parameter with a hand-written AdamW update.
    key = model.blocks[1].ffn.key_param
    st = {k: v.clone() for k, v in opt.state[key].items()}
    before = key.detach().clone()
    gen = torch.Generator().manual_seed(99)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grad = key.grad.clone()
    assert torch.count_nonzero(grad[16:]) > 0  # new zero keys get gradient through their random values
    opt.step()
    lr, (b1, b2), wd, eps = 1e-2, (0.9, 0.95), 0.05, 1e-8
    step = st["step"].item() + 1
    m = b1 * st["exp_avg"] + (1 - b1) * grad
    v = b2 * st["exp_avg_sq"] + (1 - b2) * grad * grad
    expect = before * (1 - lr * wd) - lr * (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + eps)
    torch.testing.assert_close(key.detach(), expect, rtol=1e-5, atol=1e-7)
    # the seeded second moment damps the new rows' first update compared with a zero second moment
    v_zero = (1 - b2) * grad[16:] * grad[16:]
    zero_update = lr * (m[16:] / (1 - b1 ** step)) / ((v_zero / (1 - b2 ** step)).sqrt() + eps)
    seeded_update = (key.detach()[16:] - before[16:] * (1 - lr * wd)).abs()
    assert seeded_update.sum() < zero_update.abs().sum()


def test_zero_keys_and_zero_values_would_be_dead():
    """The reason new values are random: with zero keys AND zero values no gradient reaches the new tokens."""
    torch.manual_seed(0)
    model = tiny()
    grow_model(model, ffn_tokens=24, seed=0)
    dead = copy.deepcopy(model)
    with torch.no_grad():
        for m in (dead.blocks[0].ffn, dead.blocks[1].ffn):
            m.value_param[16:].zero_()
    x = torch.randn(2, 3, 32, 32)
    for net in (model, dead):
        net(x).square().sum().backward()
    live_grad = model.blocks[0].ffn.key_param.grad[16:]
    dead_grad = dead.blocks[0].ffn.key_param.grad[16:]
    assert live_grad.abs().max() > 1e-6
    assert torch.count_nonzero(dead_grad) == 0
    assert torch.count_nonzero(dead.blocks[0].ffn.value_param.grad[16:]) == 0


def test_sgd_momentum_and_unsupported_state():
    torch.manual_seed(0)
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, opt, steps=2)
    old = snapshot(opt)
    grown = grow_training_state(model, attn_tokens=9, optimizer=opt)
    g = grown[0]
    buf = opt.state[g.new]["momentum_buffer"]
    assert buf.shape == g.new.shape
    assert torch.equal(buf[: g.old_rows], old[id(g.old)]["momentum_buffer"])
    assert torch.count_nonzero(buf[g.old_rows:]) == 0
    # factored (Adafactor-like) state has no row layout to extend: a clear error, not silent corruption
    with pytest.raises(ValueError, match="exp_avg_sq_row"):
        grow_param_state({"exp_avg_sq_row": torch.ones(8)}, 8, (10, 4))
    with pytest.raises(ValueError, match="second_moment"):
        grow_param_state({}, 8, (10, 4), second_moment="max")


def test_optimizer_follows_replaced_parameters_in_groups():
    torch.manual_seed(0)
    model = tiny()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)
    train_steps(model, opt, steps=1)
    grown = grow_model(model, attn_tokens=10)
    grow_optimizer(opt, grown)
    assert [id(p) for p in opt.param_groups[0]["params"]] == [
        id(p) for n, p in model.named_parameters() if p.ndim > 1]
    assert not any(g.old in opt.state for g in grown)
    train_steps(model, opt, steps=1)  # shapes consistent: AdamW steps without error


def test_ema_grows_and_keeps_its_function():
    torch.manual_seed(0)
    model = tiny()
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        train_steps(model, opt, steps=1)
        ema.update(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = ema.module(x)
    grow_training_state(model, attn_tokens=12, ffn_tokens=20, optimizer=opt, ema=ema, seed=3)
    assert ema.module.attn_tokens == 12 and ema.module.ffn_tokens == 20
    with torch.no_grad():
        torch.testing.assert_close(ema.module(x), ref, rtol=0, atol=2e-5)
    assert torch.equal(ema.module.blocks[1].ffn.value_param[16:], model.blocks[1].ffn.value_param[16:])
    assert not torch.equal(ema.module.blocks[1].ffn.value_param[:16], model.blocks[1].ffn.value_param[:16])
    train_steps(model, opt, steps=1)
    ema.update(model)  # shapes agree again

    with pytest.raises(TypeError, match="grow"):
        grow_ema(torch.nn.Linear(2, 2), model, [])


@pytest.mark.parametrize("schedule,match", [
    ([], "non-empty"),
    ([{"attn_tokens": 16}], "exactly one of 'step' or 'epoch'"),
    ([{"step": 3, "epoch": 1, "attn_tokens": 16}], "exactly one"),
    ([{"step": 3}], "attn_tokens and/or ffn_tokens"),
    ([{"step": 3, "attn_tokens": 16}, {"step": 3, "attn_tokens": 32}], "strictly increasing"),
    ([{"step": 5, "attn_tokens": 16}, {"step": 3, "attn_tokens": 32}], "strictly increasing"),
    ([{"step": 3, "attn_tokens": 16}, {"epoch": 5, "attn_tokens": 32}], "mixes"),
    ([{"step": 3, "attn_tokens": 16}, {"step": 5, "attn_tokens": 12}], "shrinks"),
    ([{"step": 3, "attn_tokens": 16}, {"step": 5, "attn_tokens": 16}], "do not increase"),
    ([{"step": 3, "attn_tokens": 16, "ffn_tokens": 64}, {"step": 5, "ffn_tokens": 64}], "do not increase"),
    ([{"step": 3, "attn_tokens": 0}], "≥ 1"),
    ([{"step": -1, "attn_tokens": 16}], "non-negative"),
    ([{"step": 2.5, "attn_tokens": 16}], "non-negative int"),
    ([{"step": 2, "attn": 16}], "unknown keys"),
])
def test_bad_schedules_are_config_errors(schedule, match):
    with pytest.raises(ValueError, match=match):
        validate_schedule(schedule)
    with pytest.raises(ValueError, match=match):
        GrowthCallback(schedule=schedule)


def test_schedule_normalised_and_callback_options_checked():
    sched = validate_schedule([{"epoch": 1, "attn_tokens": 16, "rewarm_steps": 4},
                               {"epoch": 3, "ffn_tokens": 128, "attn_tokens": None}])
    assert [s.as_dict() for s in sched] == [{"epoch": 1, "attn_tokens": 16, "rewarm_steps": 4},
                                            {"epoch": 3, "ffn_tokens": 128}]
    with pytest.raises(ValueError, match="rewarm_steps"):
        GrowthCallback(schedule=sched, rewarm_steps=-1)
    with pytest.raises(ValueError, match="second_moment"):
        GrowthCallback(schedule=sched, second_moment="ones")


def test_grow_model_rejects_shrinking_and_non_tokenformer():
    model = tiny()
    with pytest.raises(ValueError, match="shrink"):
        grow_model(model, attn_tokens=4)
    with pytest.raises(TypeError, match="grow"):
        grow_model(torch.nn.Linear(3, 3), attn_tokens=4)


def test_pending_gradients_grow_with_their_parameters():
    torch.manual_seed(0)
    model = timm.create_model("tokenformer_tiny", img_size=32, patch_size=8, depth=2, num_classes=3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # a pending gradient, as in the middle of accumulation
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    grown = {g.name: g for g in grow_model(model, attn_tokens=256)}
    assert grown
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.shape == param.shape, name
        rows = before[name].shape[0]
        torch.testing.assert_close(param.grad[:rows], before[name], rtol=0, atol=0)
        assert not param.grad[rows:].any(), name
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # accumulating into the grown gradients works


def test_readme_recipe_grows_between_steps_with_the_last_loss_alive():
    """The plain-PyTorch recipe in the normal loop shape: the previous step's loss (and its graph) is still
    referenced when growth happens, and the next backward and step work (an in-place .data swap used to fail
    with "invalid gradient ... expected shape compatible with [768, 192]")."""
    torch.manual_seed(0)
    model = timm.create_model("tokenformer_tiny", img_size=32, patch_size=8, depth=2, num_classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = ModelEmaV3(model, decay=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
    for step in range(4):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward(retain_graph=True)  # keep the graph alive too, as a logging hook might
        opt.step()
        ema.update(model)
        if step == 1:
            grow_training_state(model, attn_tokens=256, ffn_tokens=1024, optimizer=opt, ema=ema, seed=0)
            assert model.token_counts == {"attn_tokens": 256, "ffn_tokens": 1024}
    assert torch.isfinite(loss)
    assert all(p.shape == opt.state[p]["exp_avg"].shape for p in model.parameters())
    assert ema.module.token_counts == model.token_counts
