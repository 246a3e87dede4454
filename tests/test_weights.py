"""``tokenformer_vision.weights.load_weights``: every source (.ckpt, .pth, .safetensors, an export folder, a dict),
EMA or raw, the head kept / reset / dropped, growth on request, and one error naming what differs. Tiny models."""

from __future__ import annotations

import collections
import os
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from tokenformer_vision.weights import load_weights, read_checkpoint

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def tiny(num_classes: int = 3, **kwargs) -> torch.nn.Module:
    return timm.create_model("tokenformer_tiny", num_classes=num_classes, **{**TINY, **kwargs}).eval()


def trained(num_classes: int = 3, seed: int = 0, grow: dict | None = None) -> torch.nn.Module:
    """A model whose every tensor differs from a fresh one (zero keys of grown tokens included)."""
    torch.manual_seed(seed)
    model = tiny(num_classes)
    if grow:
        model.grow(**grow)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def sources(tmp_path):
    """The same raw weights in every format, plus a Lightning checkpoint that also holds other EMA weights."""
    raw, ema = trained(seed=0), trained(seed=1)
    state = raw.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "w.pth")  # a DDP-wrapped state dict
    (tmp_path / "export").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "export" / "model.safetensors")
    lightning = {**{f"model.{k}": v for k, v in state.items()}, **{f"ema.module.{k}": v for k, v in
                                                                   ema.state_dict().items()}}
    torch.save({"state_dict": lightning, "hyper_parameters": {"model_name": "tokenformer_tiny"}}, tmp_path / "w.ckpt")
    return raw, ema, tmp_path


def test_every_source_loads_the_same_weights(sources):
    raw, ema, folder = sources
    for source in (folder / "w.safetensors", folder / "w.pth", folder / "export", raw.state_dict()):
        model = tiny()
        result = load_weights(model, source)
        assert same_weights(model, raw), source
        assert result["head"] == "loaded"
    # a Lightning checkpoint: its EMA weights by default, the raw ones on request
    model = tiny()
    load_weights(model, folder / "w.ckpt")
    assert same_weights(model, ema)
    load_weights(model, read_checkpoint(folder / "w.ckpt"), ema=False)
    assert same_weights(model, raw)
    with pytest.raises(ValueError, match="no EMA weights"):
        load_weights(tiny(), folder / "w.safetensors", ema=True)


def test_head_kept_reset_dropped_or_chosen(sources):
    raw, _, folder = sources
    with pytest.raises(ValueError, match=r"w\.safetensors does not fit tokenformer_tiny: num_classes 3 in the weights "
                                         r"vs 5 in the model \(head='reset' fine-tunes"):
        load_weights(tiny(5), folder / "w.safetensors")
    for head in ("reset", "auto"):
        torch.manual_seed(7)
        model = tiny(5)
        fresh_head = model.head.weight.clone()
        assert load_weights(model, folder / "w.safetensors", head=head)["head"] == "reset"
        assert torch.equal(model.head.weight, fresh_head)
        assert all(torch.equal(v, raw.state_dict()[k]) for k, v in model.state_dict().items()
                   if not k.startswith("head."))
    assert load_weights(model := tiny(3), folder / "w.safetensors", head="auto")["head"] == "loaded"
    assert same_weights(model, raw)
    model = tiny(3)
    assert load_weights(model, folder / "w.safetensors", head="drop")["head"] == "dropped"
    assert model.num_classes == 0 and not any(k.startswith("head.") for k in model.state_dict())


def test_growth_only_when_asked(tmp_path):
    grown = trained(grow={"attn_tokens": 40, "ffn_tokens": 136})
    save_file({k: v.contiguous() for k, v in grown.state_dict().items()}, tmp_path / "g.safetensors")
    with pytest.raises(ValueError, match=r"attn_tokens 40 in the weights vs 32 in the model; ffn_tokens 136 in the "
                                         r"weights vs 128 in the model \(grow=True grows"):
        load_weights(tiny(), tmp_path / "g.safetensors")
    model = tiny()
    assert load_weights(model, tmp_path / "g.safetensors", grow=True)["token_counts"] == {"attn_tokens": 40,
                                                                                          "ffn_tokens": 136}
    assert same_weights(model, grown)
    with pytest.raises(ValueError, match="fewer parameter tokens.*attn_tokens: model 48, weights 40"):
        load_weights(tiny(attn_tokens=48), tmp_path / "g.safetensors", grow=True)


def test_other_architectures_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"does not fit tokenformer_tiny: the weights are of another model "
                                         r"\(embed_dim: weights 48, model 32\)"):
        load_weights(tiny(), tiny(embed_dim=48, num_heads=3).state_dict())
    with pytest.raises(ValueError, match=r"\(depth: weights 3, model 2\)"):
        load_weights(tiny(), tiny(depth=3).state_dict())
    with pytest.raises(ValueError, match="no transformer blocks"):
        load_weights(tiny(), {"weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="head must be"):
        load_weights(tiny(), tiny().state_dict(), head="new")


def test_a_pickle_that_imports_code_is_refused_by_name(tmp_path):
    class Payload:
        def __reduce__(self):
            return print, ("this must never run",)

    path = tmp_path / "raw.pkl"  # a plain pickle (not torch's zip format), protocol 4
    path.write_bytes(pickle.dumps({"x": Payload()}, protocol=4))
    with pytest.raises(ValueError, match=r"refused to load .*raw\.pkl: the file asks to import `builtins\.print`") \
            as info:
        load_weights(tiny(), path)
    assert "weights_only=False" not in str(info.value)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_every_import_of_a_refused_pickle_is_named_right(tmp_path, protocol):
    # protocol >= 4 pushes a module's name once and fetches it from the memo for its second global
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps({"a": os.system, "b": os.getcwd, "c": collections.Counter}, protocol=protocol))
    with pytest.raises(ValueError) as info:
        load_weights(tiny(), path)
    for name in (f"{os.system.__module__}.system", f"{os.getcwd.__module__}.getcwd", "collections.Counter"):
        assert f"`{name}`" in str(info.value)


def test_export_reads_the_checkpoint_once(tmp_path, monkeypatch):
    from tokenformer_vision import ImageClassifier
    from tokenformer_vision.export import export_checkpoint

    module = ImageClassifier("tokenformer_tiny", num_classes=3, img_size=32, ema_decay=0.9,
                             model_kwargs={k: v for k, v in TINY.items() if k != "img_size"})
    path = tmp_path / "c.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    loads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(str(f)) or real_load(f, *a, **k))
    export_checkpoint(path, tmp_path / "out", ema=True)
    assert loads.count(str(path)) == 1, loads


def test_timm_vit_weights_load_into_a_timm_vit():
    src, dst = (timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=3) for _ in range(2))
    assert load_weights(dst, src.state_dict())["head"] == "loaded"
    assert same_weights(dst, src)
