"""TokenFormer (Pattention) vision transformers for timm, Lightning and torchvision; importing registers
``tokenformer_tiny/small/base/large`` with timm."""

from importlib import import_module
from typing import Any

from .model import TokenFormerViT, checkpoint_filter_fn
from .pattention import Pattention

__version__ = "0.3.0"

# public name -> submodule that defines it, imported on first access (so the import stays as cheap as timm)
_LAZY = {"ImageClassifier": ".classifier", "ImageFolderDataModule": ".data", "ImageNetDataModule": ".data",
         "DigitsDataModule": ".data", "IDXDataModule": ".data", "GrowthCallback": ".callbacks"}
__all__ = ["Pattention", "TokenFormerViT", "checkpoint_filter_fn", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
