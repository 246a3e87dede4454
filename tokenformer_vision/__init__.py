"""tokenformer_vision: TokenFormer (Pattention) vision transformers for timm, Lightning and torchvision.

Importing the package registers ``tokenformer_tiny/small/base/large`` with timm.
"""

from .model import TokenFormerViT, checkpoint_filter_fn, token_counts_from_state_dict
from .pattention import Pattention, pattention_normalize

__version__ = "0.1.0"

__all__ = [
    "Pattention",
    "TokenFormerViT",
    "checkpoint_filter_fn",
    "pattention_normalize",
    "token_counts_from_state_dict",
]
