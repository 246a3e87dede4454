"""Data side of training: albumentations transforms, ImageNet-layout image folders, MNIST-format (IDX) files such as
Fashion-MNIST, and the embedded digits data.

```python
from tokenformer_vision.data import ImageFolderDataModule, DigitsDataModule, build_transforms
dm = ImageFolderDataModule("/data/imagenet", model_name="tokenformer_base", batch_size=256, num_workers=8)
dm.num_classes, dm.class_names          # known right after __init__
dm.set_epoch(3)                         # train batches of epoch 3: a function of (seed, epoch) alone
```
"""

from .datamodule import ImageClassificationDataModule
from .digits import DigitsDataModule
from .folder import ImageFolderDataModule, ImageNetDataModule, load_rgb
from .idx import FASHION_MNIST_CLASSES, IDXDataModule, find_idx_files, read_idx
from .transforms import build_transforms, reseed_transform

__all__ = ["FASHION_MNIST_CLASSES", "DigitsDataModule", "IDXDataModule", "ImageClassificationDataModule",
           "ImageFolderDataModule", "ImageNetDataModule", "build_transforms", "find_idx_files", "load_rgb", "read_idx",
           "reseed_transform"]
