"""pytest plugin that runs timm's own ``tests/test_models.py`` against the ``tokenformer_*`` models.

timm picks the models of each test by name patterns (``'vit_*'`` marks "non-standard" transformer models without
a spatial CNN feature API) and by module (``'vision_transformer'`` for models with ``forward_intermediates``).
This plugin registers our models before the test module is imported (its model lists are built at import time),
treats ``tokenformer*`` like ``vit_*`` and our model module like ``vision_transformer``, and deselects every test
item that is not about one of the models named in ``TOKENFORMER_TIMM_MODELS`` (default: tiny and small).

Used by ``tests/test_timm_suite.py``:  ``pytest -p timm_plugin <timm sdist>/tests/test_models.py``.
"""

from __future__ import annotations

import fnmatch
import os

import pytest
import timm
import timm.models
import timm.models._registry as registry

import tokenformer_vision  # noqa: F401  (registers the models)

OUR_PATTERN = "tokenformer*"
OUR_MODULE = "model"  # timm keys a model's module by the last part of its module name (tokenformer_vision.model)
SELECTED = [
    name.strip() for name in os.environ.get("TOKENFORMER_TIMM_MODELS", "tokenformer_tiny,tokenformer_small").split(",")
    if name.strip()
]

_original_list_models = registry.list_models


def _as_list(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _matches_vit(patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch("vit_base_patch16_224", p) for p in patterns)


def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                include_tags=None):
    """timm.list_models restricted to the selected tokenformer models, which are treated like ``vit_*``."""
    filters, excludes, modules = _as_list(filter), _as_list(exclude_filters), _as_list(module)
    if filters and _matches_vit(filters):
        filters.append(OUR_PATTERN)
    if excludes and _matches_vit(excludes):
        excludes.append(OUR_PATTERN)
    if "vision_transformer" in modules:
        modules.append(OUR_MODULE)
    names = _original_list_models(filters, modules, pretrained, excludes, name_matches_cfg, include_tags)
    return [n for n in names if n.split(".")[0] in SELECTED]


timm.list_models = list_models
timm.models.list_models = list_models
registry.list_models = list_models


# TorchScript is deprecated in PyTorch 2.x and the model is not written for it (PEP 604 annotations, a custom
# autograd function in the Pattention kernel); torch.compile, torch.export and ONNX are supported and tested instead.
# strict=True: if scripting ever starts working, these tests report XPASS as a failure and the mark must go.
UNSUPPORTED = {
    "test_model_forward_torchscript": "TorchScript is not supported (deprecated); use torch.compile/torch.export",
    "test_model_forward_fx_torchscript": "TorchScript is not supported (deprecated); use torch.compile/torch.export",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = str(params.get("model_name", ""))
        (keep if name.split(".")[0] in SELECTED else drop).append(item)
        reason = UNSUPPORTED.get(getattr(item, "originalname", item.name))
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
