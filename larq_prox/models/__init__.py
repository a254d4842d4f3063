"""Models: the paper's binary models, a small ViT, convert() and binarize().

```python
import larq_prox as lqp

model = lqp.models.binarynet(batch_norm="proposed", low_memory=True)   # DESIGN section 11
zoo = lqz.literature.BiRealNet(input_shape=(64, 64, 3), weights=None, num_classes=10)
converted = lqp.models.convert(zoo, batch_norm="proposed", low_memory=True)
vit = lqp.models.vit(dim=64, depth=4, heads=4, mlp_dim=128)      # float, DESIGN section 13
```
"""

from larq_prox.models.binarize import COMPONENTS, binarizable_layers, binarize
from larq_prox.models.convert import (
    convert,
    l1_to_l2_batch_norm,
    l2_to_l1_batch_norm,
    map_layers,
)
from larq_prox.models.options import BATCH_NORMS, SAVED_DTYPES, batch_norm_layer
from larq_prox.models.paper import binarynet, cnv, mlp
from larq_prox.callbacks.batch_norm import recalibrate_batch_norm
from larq_prox.models.vit import COMPONENTS as VIT_COMPONENTS
from larq_prox.models.vit import component_of, vit

__all__ = [
    "BATCH_NORMS",
    "mlp",
    "cnv",
    "binarynet",
    "vit",
    "binarize",
    "binarizable_layers",
    "COMPONENTS",
    "VIT_COMPONENTS",
    "component_of",
    "convert",
    "recalibrate_batch_norm",
    "SAVED_DTYPES",
    "map_layers",
    "batch_norm_layer",
    "l2_to_l1_batch_norm",
    "l1_to_l2_batch_norm",
]
