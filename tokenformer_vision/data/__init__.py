"""Data side of training: albumentations transforms, ImageNet-layout image folders, MNIST-format (IDX) files such as
Fashion-MNIST, and the embedded digits data.

```python
from tokenformer_vision.data import ImageFolderDataModule, DigitsDataModule, build_transforms
dm = ImageFolderDataModule("/data/imagenet", model_name="tokenformer_base", batch_size=256, num_workers=8)
dm.num_classes, dm.class_names          # known right after __init__
dm.set_epoch(3)                         # train batches of epoch 3: a function of (seed, epoch) alone
```
"""

from . import datamodule, digits, folder, idx, transforms
from .datamodule import *  # noqa: F403
from .digits import *  # noqa: F403
from .folder import *  # noqa: F403
from .idx import *  # noqa: F403
from .transforms import *  # noqa: F403

__all__ = sorted(datamodule.__all__ + digits.__all__ + folder.__all__ + idx.__all__ + transforms.__all__)
