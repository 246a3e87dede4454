"""TokenFormer detection backbones for torchvision: ViTDet simple feature pyramid + detector builders, e.g.
``fasterrcnn_tokenformer("tokenformer_base", num_classes=91, backbone_weights="classifier.ckpt")``."""

from .backbone import ViTDetBackbone, create_backbone, freeze_trunk, load_backbone_weights
from .builders import fasterrcnn_tokenformer, maskrcnn_tokenformer, retinanet_tokenformer
from .pyramid import SimpleFeaturePyramid, anchor_sizes

__all__ = ["SimpleFeaturePyramid", "ViTDetBackbone", "anchor_sizes", "create_backbone", "fasterrcnn_tokenformer",
           "freeze_trunk", "load_backbone_weights", "maskrcnn_tokenformer", "retinanet_tokenformer"]
