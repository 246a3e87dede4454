"""The growth levers of the growth benchmark: depth growth (scripts/benchlib/growth_levers.py) preserves the
function exactly and trains only the blocks in force; the new-rows warm-up moves only the appended rows;
progressive resolution (tokenformer_vision.callbacks) trains at the smaller size only, inside a real fit too."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch

import tokenformer_vision  # noqa: F401  (registers the models)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from benchlib.growth_levers import DepthGrowth, NewRowsWarmup, spread  # noqa: E402

from tokenformer_vision.callbacks import ProgressiveResolution  # noqa: E402


def tiny(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("tokenformer_tiny", num_classes=5, img_size=16, patch_size=4, in_chans=1, embed_dim=32,
                             depth=4, num_heads=2, attn_tokens=8, ffn_tokens=16, **kwargs)


def test_spread_keeps_the_first_block_and_spaces_the_rest():
    assert spread(3, 6) == [0, 2, 4]
    assert spread(2, 4) == [0, 2]
    assert spread(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        spread(0, 4)


def test_depth_growth_runs_the_kept_blocks_then_inserts_identity_blocks_exactly():
    net = tiny()
    blocks = list(net.blocks)
    module = SimpleNamespace(model=net, ema=None)
    lever = DepthGrowth(epoch=1, start_depth=2)
    lever.setup(None, module, "fit")
    assert list(net.blocks) == [blocks[0], blocks[2]] and list(net.pending_blocks) == [blocks[1], blocks[3]]
    for block in (blocks[1], blocks[3]):  # the residual branches of the blocks to come add exactly 0
        assert not block.attn.proj.value_param.any() and not block.ffn.value_param.any()

    x = torch.randn(3, 1, 16, 16)
    net.eval()
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(blocks)]
    with torch.no_grad():
        before = net(x)
    assert ran == [0, 2]  # before growth the model is the two kept blocks, nothing else
    lever.on_train_batch_start(None, module, (x, None), 0)
    lever.on_train_epoch_start(SimpleNamespace(current_epoch=0, global_step=0), module)
    assert len(net.blocks) == 2  # not yet
    lever.on_train_epoch_start(SimpleNamespace(current_epoch=1, global_step=7), module)
    assert list(net.blocks) == blocks and not hasattr(net, "pending_blocks")
    with torch.no_grad():
        assert torch.equal(net(x), before)
    assert ran[-4:] == [0, 1, 2, 3]
    for hook in hooks:
        hook.remove()
    assert lever.events[0]["max_abs_dlogits"] == 0.0 and lever.events[0]["depth_after"] == 4

    net.train()
    net(x).square().sum().backward()  # the inserted blocks learn from the first step: their values get gradient
    assert blocks[1].attn.proj.value_param.grad.abs().sum() > 0 and blocks[3].ffn.value_param.grad.abs().sum() > 0


def test_depth_growth_leaves_the_pending_blocks_alone_under_adamw():
    net = tiny()
    module = SimpleNamespace(model=net, ema=None)
    DepthGrowth(epoch=1, start_depth=2).setup(None, module, "fit")
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.05)
    pending = {k: v.detach().clone() for k, v in net.pending_blocks.state_dict().items()}
    for _ in range(2):
        net(torch.randn(2, 1, 16, 16)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(v, net.pending_blocks.state_dict()[k]) for k, v in pending.items())


def test_progressive_resolution_trains_small_and_evaluates_at_full_size():
    with pytest.raises(ValueError, match="dynamic_img_size"):
        ProgressiveResolution(8, until_epoch=1).setup(None, SimpleNamespace(model=tiny()), "fit")
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        ProgressiveResolution(10, until_epoch=1).setup(None, SimpleNamespace(model=tiny(dynamic_img_size=True)), "fit")
    with pytest.raises(ValueError, match="ints ≥ 1"):
        ProgressiveResolution(8, until_epoch=0)
    net = tiny(dynamic_img_size=True)
    module = SimpleNamespace(model=net)
    lever = ProgressiveResolution(8, until_epoch=1)
    lever.setup(None, module, "fit")
    seen = []
    net.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    x = torch.randn(2, 1, 16, 16)
    lever.on_train_epoch_start(SimpleNamespace(current_epoch=0), module)
    net.train()(x)
    net.eval()(x)
    lever.on_train_epoch_start(SimpleNamespace(current_epoch=1), module)
    net.train()(x)
    assert seen == [(8, 8), (16, 16), (16, 16)]
    lever.teardown(None, module, "fit")
    lever.on_train_epoch_start(SimpleNamespace(current_epoch=0), module)
    net.train()(x)
    assert seen[-1] == (16, 16)


def test_progressive_resolution_in_a_fit_trains_the_first_epochs_small(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from tokenformer_vision import ImageClassifier

    def loader() -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(32, 1, 16, 16), torch.arange(32).remainder(5)), batch_size=8)

    module = ImageClassifier("tokenformer_tiny", num_classes=5, img_size=16, model_kwargs=dict(
        patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, attn_tokens=8, ffn_tokens=16,
        dynamic_img_size=True))
    sizes: dict[tuple[bool, int], set] = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            def record(m, args):
                sizes.setdefault((m.training, trainer.current_epoch), set()).add(args[0].shape[-1])
            pl_module.model.patch_embed.register_forward_pre_hook(record)

    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ProgressiveResolution(8, until_epoch=2), Spy()], default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    assert sizes[(True, 0)] == sizes[(True, 1)] == {8} and sizes[(True, 2)] == {16}
    assert all(v == {16} for (training, _), v in sizes.items() if not training)


def test_new_rows_warmup_moves_only_the_appended_rows_for_its_steps():
    from tokenformer_vision.growth import grow_training_state

    net = tiny()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.05)
    net(torch.randn(2, 1, 16, 16)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    grown = grow_training_state(net, 12, 24, optimizer=optimizer, seed=0)
    growth = SimpleNamespace(events=[{"step": 5}], new_rows={g.name: g.old_rows for g in grown})
    trainer = SimpleNamespace(global_step=5, optimizers=[optimizer])
    lever = NewRowsWarmup(growth, steps=2)
    lever.on_train_start(trainer, SimpleNamespace(model=net))

    def step() -> tuple[dict, dict]:
        before = {k: v.detach().clone() for k, v in net.named_parameters()}
        net(torch.randn(2, 1, 16, 16)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        trainer.global_step += 1
        return before, dict(net.named_parameters())

    for _ in range(2):
        before, after = step()
        for name, value in after.items():
            rows = growth.new_rows.get(name, value.shape[0])
            assert torch.equal(value[:rows], before[name][:rows]), name  # old rows and other weights: put back
        assert any(not torch.equal(after[n][r:], before[n][r:]) for n, r in growth.new_rows.items())
    before, after = step()  # warm-up over: everything trains
    assert not torch.equal(after["blocks.0.ffn.key_param"][:16], before["blocks.0.ffn.key_param"][:16])
    assert not torch.equal(after["head.weight"], before["head.weight"])
    lever.on_train_end(trainer, None)
