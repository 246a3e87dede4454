"""Data side of training: albumentations transforms, ImageNet-layout image folders and the embedded digits data.

```python
from tokenformer_vision.data import ImageFolderDataModule, DigitsDataModule, build_transforms
dm = ImageFolderDataModule("/data/imagenet", model_name="tokenformer_base", batch_size=256, num_workers=8)
dm.num_classes, dm.class_names          # known right after __init__
dm.set_epoch(3)                         # train batches of epoch 3: a function of (seed, epoch) alone
```
"""

from .datamodule import (
    ImageClassificationDataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    default_num_workers,
)
from .digits import DigitsDataModule, load_digits_rgb, split_digits
from .folder import (
    ArrayDataset,
    EpochSampler,
    ImageFileDataset,
    SkipCounter,
    collate_skip_none,
    derive_seed,
    empty_class_folders,
    find_class_names,
    list_images,
    load_rgb,
    scan_split,
    seed_worker,
)
from .transforms import (
    TransformConfig,
    build_transforms,
    interpolation_flag,
    rand_augment_policy,
    reseed_transform,
    resolve_transform_config,
)

__all__ = [
    "ArrayDataset",
    "DigitsDataModule",
    "EpochSampler",
    "ImageClassificationDataModule",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "SkipCounter",
    "TransformConfig",
    "build_transforms",
    "collate_skip_none",
    "default_num_workers",
    "derive_seed",
    "empty_class_folders",
    "find_class_names",
    "interpolation_flag",
    "list_images",
    "load_digits_rgb",
    "load_rgb",
    "rand_augment_policy",
    "reseed_transform",
    "resolve_transform_config",
    "scan_split",
    "seed_worker",
    "split_digits",
]
