"""Export: Lightning checkpoint → timm weights (safetensors + config.json) → timm / ONNX / torch.compile.

One small real fit (tokenformer_tiny at depth 2, 32², EMA on, grown once mid-fit by GrowthCallback) feeds every
test; each loading route must reproduce the Lightning model's logits, and each bad input must fail with an error
that names the problem.
"""

from __future__ import annotations

import argparse
import fractions
import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import safetensors.torch
import timm
import torch
from timm.data import resolve_data_config

import tokenformer_vision.cli
from tokenformer_vision import GrowthCallback, ImageClassifier, ImageFolderDataModule
from tokenformer_vision.export import (
    CONFIG_NAME,
    ONNX_NAME,
    WEIGHTS_NAME,
    check_onnx,
    export_checkpoint,
    load_exported,
    save_timm_weights,
)

ARCH = "tokenformer_tiny"
ARCH_KWARGS = dict(depth=2, img_size=32)  # reduced for CPU CI; still the tokenformer_tiny architecture (d 192)
PRESET = {"attn_tokens": 192, "ffn_tokens": 768}
GROWN = {"attn_tokens": 208, "ffn_tokens": 800}
DATA = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=0.9, interpolation="bilinear")


@pytest.fixture(scope="module")
def fitted(imagefolder: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Fit 4 steps (grow 192/768 → 208/800 after step 2), save a checkpoint, export it with the CLI (+ ONNX)."""
    tmp = tmp_path_factory.mktemp("export")
    L.seed_everything(0)
    dm = ImageFolderDataModule(str(imagefolder), img_size=32, batch_size=4, num_workers=0, model_name=ARCH, **DATA)
    module = ImageClassifier(ARCH, num_classes=dm.num_classes, img_size=32, model_kwargs={"depth": 2},
                             ema_decay=0.5, lr=1e-2)
    growth = GrowthCallback([{"step": 2, **GROWN}], check_samples=0)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[growth], default_root_dir=str(tmp))
    trainer.fit(module, dm)
    ckpt = tmp / "fit.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp / "export"
    export_cli("--ckpt_path", str(ckpt), "--out", str(out), "--onnx")
    module.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, ema_logits = module(x), module.ema.module(x)
    return SimpleNamespace(module=module, ckpt=ckpt, out=out, tmp=tmp, x=x, logits=logits, ema_logits=ema_logits,
                           class_names=list(dm.class_names))


def export_cli(*args: str) -> None:
    tokenformer_vision.cli.main(["export", *args])


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def test_fit_really_grew_and_trained_the_new_tokens(fitted):
    model = fitted.module.model
    assert {"attn_tokens": model.attn_tokens, "ffn_tokens": model.ffn_tokens} == GROWN
    # new keys start at zero; two optimizer steps after growth they must have moved (they carry gradient)
    new_keys = model.blocks[0].ffn.key_param[PRESET["ffn_tokens"]:]
    assert new_keys.abs().max() > 0


def test_export_layout_matches_timm(fitted):
    assert sorted(p.name for p in fitted.out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, ONNX_NAME])
    config = json.loads((fitted.out / CONFIG_NAME).read_text())
    assert config["architecture"] == ARCH
    assert config["num_classes"] == 3 and config["num_features"] == 192
    assert config["label_names"] == fitted.class_names == ["cat", "dog", "fox"]
    args = config["model_args"]
    assert {k: args[k] for k in GROWN} == GROWN
    assert args["depth"] == 2 and tuple(args["img_size"]) == (32, 32) and args["num_classes"] == 3
    cfg = config["pretrained_cfg"]
    assert tuple(cfg["input_size"]) == (3, 32, 32)
    assert tuple(cfg["mean"]) == DATA["mean"] and tuple(cfg["std"]) == DATA["std"]
    assert cfg["crop_pct"] == DATA["crop_pct"] and cfg["interpolation"] == DATA["interpolation"]
    # plain timm keys (no Lightning prefix), grown shapes, exactly the Lightning model's tensors
    weights = safetensors.torch.load_file(fitted.out / WEIGHTS_NAME)
    expected = fitted.module.model.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_local_dir_route_reproduces_lightning_logits(fitted):
    model = timm.create_model(f"local-dir:{fitted.out}", pretrained=True)
    assert {"attn_tokens": model.attn_tokens, "ffn_tokens": model.ffn_tokens} == GROWN  # built grown directly
    assert _max_diff(_logits(model, fitted.x), fitted.logits) <= 1e-6
    data = resolve_data_config(model=model)
    assert data["input_size"] == (3, 32, 32) and tuple(data["mean"]) == DATA["mean"]
    assert data["crop_pct"] == DATA["crop_pct"] and data["interpolation"] == DATA["interpolation"]
    assert model.pretrained_cfg["label_names"] == fitted.class_names


def test_pretrained_cfg_overlay_route_grows_and_reproduces_logits(fitted):
    # built at the preset's 192/768 tokens; checkpoint_filter_fn grows it to the file's 208/800
    model = timm.create_model(ARCH, pretrained=True, **ARCH_KWARGS, pretrained_cfg_overlay=dict(
        file=str(fitted.out / WEIGHTS_NAME), num_classes=3))
    assert {"attn_tokens": model.attn_tokens, "ffn_tokens": model.ffn_tokens} == GROWN
    assert _max_diff(_logits(model, fitted.x), fitted.logits) <= 1e-6


def test_lightning_reload_and_load_exported_agree(fitted):
    reloaded = ImageClassifier.load_from_checkpoint(fitted.ckpt, weights_only=True)
    assert _max_diff(_logits(reloaded.model, fitted.x), fitted.logits) <= 1e-6
    assert _max_diff(_logits(load_exported(fitted.out), fitted.x), fitted.logits) <= 1e-6
    # a bare weights file (no config.json next to it) needs the architecture and its kwargs
    bare = fitted.tmp / "bare" / "weights.safetensors"
    bare.parent.mkdir()
    shutil.copy(fitted.out / WEIGHTS_NAME, bare)
    with pytest.raises(ValueError, match="model_name"):
        load_exported(bare)
    model = load_exported(bare, model_name=ARCH, **ARCH_KWARGS)
    assert _max_diff(_logits(model, fitted.x), fitted.logits) <= 1e-6


def test_back_into_lightning(fitted):
    # timm weights → a new ImageClassifier (built at the preset token counts, grown by the filter on load)
    weights = str(fitted.out / WEIGHTS_NAME)
    module = ImageClassifier(ARCH, num_classes=3, img_size=32, model_kwargs={"depth": 2}, pretrained=weights)
    assert module.model.attn_tokens == GROWN["attn_tokens"]
    assert _max_diff(_logits(module, fitted.x), fitted.logits) <= 1e-6
    finetune = ImageClassifier(ARCH, num_classes=5, img_size=32, model_kwargs={"depth": 2}, pretrained=weights)
    with torch.no_grad():
        assert torch.equal(finetune.eval().model.forward_features(fitted.x),
                           module.eval().model.forward_features(fitted.x))


def test_ema_export(fitted):
    out = fitted.tmp / "export_ema"
    export_checkpoint(fitted.ckpt, out, ema=True)
    model = load_exported(out)
    assert _max_diff(_logits(model, fitted.x), fitted.ema_logits) <= 1e-6
    assert _max_diff(fitted.ema_logits, fitted.logits) > 1e-3  # the EMA weights really are other weights


def test_reset_classifier_for_fine_tuning(fitted):
    with pytest.raises(ValueError, match=r"num_classes=5 but the saved head has 3 classes.*reset_classifier"):
        load_exported(fitted.out, num_classes=5)
    model = load_exported(fitted.out, num_classes=5, reset_classifier=True)
    assert model.num_classes == 5 and model.head.weight.shape == (5, 192)
    reference = load_exported(fitted.out)
    with torch.no_grad():
        assert torch.equal(model.forward_features(fitted.x), reference.forward_features(fitted.x))
    # timm's own fine-tuning route: cfg num_classes = the file's, model num_classes = the new head
    model = timm.create_model(f"local-dir:{fitted.out}", pretrained=True, num_classes=7)
    assert model.num_classes == 7 and model.attn_tokens == GROWN["attn_tokens"]


def test_onnx_matches_pytorch_with_dynamic_batch(fitted):
    import onnxruntime as ort

    model = load_exported(fitted.out)
    session = ort.InferenceSession(str(fitted.out / ONNX_NAME), providers=["CPUExecutionProvider"])
    for batch in (fitted.x, fitted.x[:1]):  # exported with batch 2: other batch sizes must run too
        (got,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
        assert _max_diff(torch.from_numpy(got), _logits(model, batch)) <= 1e-4
    assert check_onnx(fitted.out / ONNX_NAME, model, fitted.x) <= 1e-4


def test_onnx_check_catches_a_wrong_model(fitted):
    other = load_exported(fitted.out, reset_classifier=True)  # same shapes, freshly initialised head
    assert other.num_classes == 3
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        check_onnx(fitted.out / ONNX_NAME, other, fitted.x)


def test_torch_compile_of_the_classifier_in_eval_mode(fitted):
    torch._dynamo.reset()
    # default backend (inductor, C++ on CPU: ≈30-50 s cold on the 2-core box) and fullgraph: the whole eval forward
    # of the LightningModule is one graph, no graph breaks
    compiled = torch.compile(fitted.module, fullgraph=True)
    assert _max_diff(_logits(compiled, fitted.x), fitted.logits) <= 1e-5


# ---------------------------------------------------------------------------------------------- bad inputs
def test_missing_files(fitted, tmp_path, capsys):
    with pytest.raises(SystemExit, match="checkpoint not found.*nope.ckpt"):  # one line, non-zero status
        export_cli("--ckpt_path", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_exported(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_exported(tmp_path)
    (tmp_path / "d").mkdir()
    shutil.copy(fitted.out / CONFIG_NAME, tmp_path / "d" / CONFIG_NAME)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_exported(tmp_path / "d")


def test_truncated_files(fitted, tmp_path, capsys):
    data = fitted.ckpt.read_bytes()
    ckpt = tmp_path / "cut.ckpt"
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="truncated or not a PyTorch checkpoint"):
        export_cli("--ckpt_path", str(ckpt), "--out", str(tmp_path / "o"))
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint" * 64)
    with pytest.raises(ValueError, match="truncated or not a PyTorch checkpoint"):
        export_checkpoint(tmp_path / "garbage.ckpt", tmp_path / "o")
    # an object weights_only refuses: named, never loaded with weights_only=False
    torch.save({"state_dict": {}, "hyper_parameters": {"f": fractions.Fraction(1, 3)}}, tmp_path / "obj.ckpt")
    with pytest.raises(ValueError, match=r"refused to load .*obj\.ckpt: the file asks to import `fractions\.Fraction`"):
        export_checkpoint(tmp_path / "obj.ckpt", tmp_path / "o")
    # timm's training checkpoints keep their args as an argparse.Namespace: allowed, as timm allows it
    torch.save({"state_dict": {}, "args": argparse.Namespace(a=1)}, tmp_path / "ns.ckpt")
    with pytest.raises(ValueError, match="no 'model_name'"):
        export_checkpoint(tmp_path / "ns.ckpt", tmp_path / "o")
    out = tmp_path / "cut"
    shutil.copytree(fitted.out, out)
    weights = (out / WEIGHTS_NAME).read_bytes()
    (out / WEIGHTS_NAME).write_bytes(weights[:-1000])
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        load_exported(out)


def test_checkpoint_of_another_model(fitted, tmp_path):
    # timm ViT weights are not TokenFormer weights: both loading routes say so
    vit = timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32, num_classes=3)
    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(vit.state_dict(), path)
    with pytest.raises(ValueError, match="another model"):
        timm.create_model(ARCH, pretrained=True, **ARCH_KWARGS, pretrained_cfg_overlay=dict(file=str(path),
                                                                                           num_classes=3))
    with pytest.raises(ValueError, match="another model"):
        load_exported(path, model_name=ARCH, **ARCH_KWARGS)
    # a checkpoint whose hparams name another architecture than its weights
    ckpt = torch.load(fitted.ckpt, weights_only=True)
    ckpt["hyper_parameters"]["model_kwargs"] = {"depth": 3}
    ckpt.pop("token_counts")
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"other\.ckpt does not fit tokenformer_tiny: the weights are of another "
                                         r"model \(depth: weights 2, model 3\)"):
        export_checkpoint(tmp_path / "other.ckpt", tmp_path / "o")
    # not an ImageClassifier checkpoint at all
    torch.save({"state_dict": {"net.weight": torch.zeros(2)}, "hyper_parameters": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="no\n? ?'model_name'"):
        export_checkpoint(tmp_path / "foreign.ckpt", tmp_path / "o")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        export_checkpoint(tmp_path / "plain.pt", tmp_path / "o")


def test_no_ema_weights_and_inconsistent_token_counts(fitted, tmp_path):
    ckpt = torch.load(fitted.ckpt, weights_only=True)
    no_ema = {**ckpt, "state_dict": {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("ema.")}}
    torch.save(no_ema, tmp_path / "no_ema.ckpt")
    with pytest.raises(ValueError, match="no EMA weights"):
        export_checkpoint(tmp_path / "no_ema.ckpt", tmp_path / "o", ema=True)
    torch.save({**ckpt, "token_counts": PRESET}, tmp_path / "lying.ckpt")
    with pytest.raises(ValueError, match=r"lying\.ckpt is inconsistent: its token_counts say .*'attn_tokens': 192.*"
                                         r"its weights have .*'attn_tokens': 208"):
        export_checkpoint(tmp_path / "lying.ckpt", tmp_path / "o")


def test_wrong_num_classes_on_the_timm_route(fitted):
    with pytest.raises(ValueError, match=r"classifier has 3 classes but the pretrained cfg says num_classes=5.*"
                                         r"num_classes=3"):
        timm.create_model(ARCH, pretrained=True, **ARCH_KWARGS, pretrained_cfg_overlay=dict(
            file=str(fitted.out / WEIGHTS_NAME), num_classes=5))
    with pytest.raises(ValueError, match="num_classes=1000"):  # overlay without num_classes: timm's default 1000
        timm.create_model(ARCH, pretrained=True, **ARCH_KWARGS,
                          pretrained_cfg_overlay=dict(file=str(fitted.out / WEIGHTS_NAME)))


def test_token_count_mismatches(fitted, tmp_path):
    # config.json that disagrees with the weights file
    out = tmp_path / "bad_config"
    shutil.copytree(fitted.out, out)
    config = json.loads((out / CONFIG_NAME).read_text())
    config["model_args"]["attn_tokens"] = PRESET["attn_tokens"]
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json's token counts disagree.*attn_tokens: config.json 192, "
                                         "weights 208"):
        timm.create_model(f"local-dir:{out}", pretrained=True)
    # a file with fewer tokens than the model it is loaded into
    with pytest.raises(ValueError, match="fewer parameter tokens.*attn_tokens: model 256, weights 208"):
        timm.create_model(ARCH, pretrained=True, **ARCH_KWARGS, attn_tokens=256, pretrained_cfg_overlay=dict(
            file=str(fitted.out / WEIGHTS_NAME), num_classes=3))


def test_no_pretrained_entries_without_weights():
    # no public TokenFormer weights exist: list_pretrained must not advertise any
    assert timm.list_pretrained("tokenformer*") == []


def test_save_timm_weights_rejects_what_it_cannot_describe(tmp_path):
    kwargs = dict(img_size=32, depth=1, embed_dim=48, num_heads=3, num_classes=3)
    with pytest.raises(ValueError, match="no pretrained_cfg.*timm.create_model"):
        save_timm_weights(tokenformer_vision.TokenFormerViT(**kwargs), tmp_path / "a")
    model = timm.create_model(ARCH, **kwargs)
    with pytest.raises(ValueError, match="2 label names for a model with num_classes=3"):
        save_timm_weights(model, tmp_path / "b", label_names=["x", "y"])
    # a model built in Python (not from a checkpoint) round-trips too, with its own kwargs in model_args
    save_timm_weights(model, tmp_path / "c", label_names=["x", "y", "z"])
    loaded = load_exported(tmp_path / "c")
    assert (loaded.embed_dim, len(loaded.blocks), loaded.pretrained_cfg["label_names"]) == (48, 1, ["x", "y", "z"])
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_malicious_pickle_is_refused_by_name(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return os.system, ("echo this must never run",)

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, path)
    with pytest.raises(SystemExit) as info:
        export_cli("--ckpt_path", str(path), "--out", str(tmp_path / "o"))
    message = str(info.value.code)
    assert f"refused to load {path}: the file asks to import `{os.system.__module__}.system`" in message
    assert "weights_only=False" not in message and "will likely succeed" not in message
    assert len(message.splitlines()) <= 15
    assert "this must never run" not in capsys.readouterr().out


def test_exported_files_have_the_usual_permissions(fitted):
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {name: stat.S_IMODE((fitted.out / name).stat().st_mode) for name in (WEIGHTS_NAME, CONFIG_NAME)}
    assert modes == {WEIGHTS_NAME: 0o666 & ~umask, CONFIG_NAME: 0o666 & ~umask}, modes


def test_pretrained_cfg_overlay_route_reports_the_input_size_given_in_the_overlay(fitted):
    # the overlay route reads no config.json: the export's input size comes with the overlay (or use local-dir:)
    model = timm.create_model(ARCH, pretrained=True, **ARCH_KWARGS, pretrained_cfg_overlay=dict(
        file=str(fitted.out / WEIGHTS_NAME), num_classes=3, input_size=(3, 32, 32)))
    assert resolve_data_config(model=model)["input_size"] == (3, 32, 32)
    assert _max_diff(_logits(model, fitted.x), fitted.logits) <= 1e-6


def test_pretrained_cfg_overlay_route_reports_the_size_the_model_is_built_at(fitted):
    # without input_size in the overlay, the data config follows the model's img_size, not the preset's 224²
    model = timm.create_model(ARCH, pretrained=True, **ARCH_KWARGS, pretrained_cfg_overlay=dict(
        file=str(fitted.out / WEIGHTS_NAME), num_classes=3))
    assert resolve_data_config(model=model)["input_size"] == (3, 32, 32)
