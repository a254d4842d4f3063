"""A small vision transformer whose attention and MLP are larq `QuantDense` layers.

```python
import larq_prox as lqp

float_vit = lqp.models.vit(patch_size=7, dim=64, depth=4, heads=4, mlp_dim=128)
binary_vit = lqp.models.vit(patch_size=7, dim=64, depth=4, heads=4, mlp_dim=128,
                            kernel_quantizer="pcpp_bnn", input_quantizer="pcpp_bnn")
```

Layout (ViT, Dosovitskiy et al.): patch embedding (a `patch_size` x
`patch_size` convolution with that stride, `patch_embedding`), a class token
(`pool="class"`) or mean pooling over the tokens (`pool="mean"`), a learned
position embedding, `depth` pre-norm encoder blocks, a final LayerNorm and the
dense `head`. Block i:

    x = x + block{i}_attention(block{i}_norm_1(x))     # MultiHeadSelfAttention
    x = x + block{i}_mlp_2(gelu(block{i}_mlp_1(block{i}_norm_2(x))))   # tanh GELU

The layer names are the contract `binarize()` reads: `component_of(name)`
gives a layer's (block, component), component one of `COMPONENTS`.
`binary` picks the components that get the quantizers: "attention" (the four
projections), "mlp" (both dense layers), "embedding" (kernel only: its input
is the float image), "head". Without quantizers the model is a float model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import tensorflow as tf

from larq_prox import quantizers as pcpp_quantizers
from larq_prox.layers.attention import MultiHeadSelfAttention
from larq_prox.layers.binary import QuantConv2D, QuantDense
from larq_prox.layers.gelu import TanhGELU
from larq_prox.layers.tokens import ClassToken, PositionEmbedding

__all__ = ["COMPONENTS", "POOLS", "component_of", "vit"]

COMPONENTS = ("embedding", "attention", "mlp", "head")
"""Parts of a ViT that `binary` (and `binarize`) can select."""

POOLS = ("class", "mean")

_BLOCK = re.compile(r"^block(\d+)_(attention|mlp)(?:_\d+)?$")


def component_of(name: str) -> tuple[int | None, str | None]:
    """(block, component) of a ViT layer name; (None, None) for other layers.

    ```python
    component_of("block2_mlp_1")         # (2, "mlp")
    component_of("patch_embedding")      # (None, "embedding")
    ```
    """
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)), match.group(2)
    if name == "patch_embedding":
        return None, "embedding"
    if name == "head":
        return None, "head"
    return None, None


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    return value


def vit(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    patch_size: int = 7,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_dim: int = 128,
    kernel_quantizer=None,
    input_quantizer=None,
    binary: Sequence[str] = ("attention", "mlp"),
    pool: str = "class",
    name: str = "vit",
) -> tf.keras.Model:
    """A small ViT; the `binary` components get `kernel_quantizer` / `input_quantizer`.

    ```python
    model = lqp.models.vit(dim=32, depth=2, heads=2, mlp_dim=64, kernel_quantizer="pcpp_bnn")
    ```

    # Arguments
        input_shape: (height, width, channels); height and width divisible by `patch_size`.
        num_classes: outputs of the head (logits: no softmax).
        patch_size, dim, depth, heads, mlp_dim: the ViT's sizes (`dim` divisible by `heads`).
        kernel_quantizer, input_quantizer: larq quantizers (strings or objects) of
            the `binary` components; None for both gives a float model.
        binary: components that get the quantizers, a subset of `COMPONENTS`.
        pool: "class" (class token) or "mean" (mean of the tokens).
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"`input_shape` must be (height, width, channels), got {input_shape}.")
    for key, value in (("num_classes", num_classes), ("patch_size", patch_size), ("dim", dim),
                       ("depth", depth), ("heads", heads), ("mlp_dim", mlp_dim)):
        _positive(key, value)
    if input_shape[0] % patch_size or input_shape[1] % patch_size:
        raise ValueError(
            f"`patch_size` ({patch_size}) must divide the image size {input_shape[:2]}."
        )
    if dim % heads:
        raise ValueError(f"`dim` ({dim}) must be divisible by `heads` ({heads}).")
    if isinstance(binary, str):
        binary = (binary,)
    unknown = [c for c in binary if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"`binary` must be a subset of {COMPONENTS}, got unknown {unknown}.")
    if pool not in POOLS:
        raise ValueError(f"`pool` must be one of {POOLS}, got {pool!r}.")
    for quantizer in (kernel_quantizer, input_quantizer):
        if quantizer is not None:
            pcpp_quantizers.get(quantizer)  # an unknown name fails now, with the choices

    def quantizers(component: str, image_input: bool = False) -> dict:
        if component not in binary:
            return {}
        return {"kernel_quantizer": kernel_quantizer,
                "input_quantizer": None if image_input else input_quantizer}

    inputs = tf.keras.Input(input_shape)
    x = QuantConv2D(dim, patch_size, strides=patch_size, name="patch_embedding",
                    **quantizers("embedding", image_input=True))(inputs)
    tokens = (input_shape[0] // patch_size) * (input_shape[1] // patch_size)
    x = tf.keras.layers.Reshape((tokens, dim), name="patches")(x)
    if pool == "class":
        x = ClassToken(name="class_token")(x)
    x = PositionEmbedding(name="position_embedding")(x)
    for i in range(depth):
        y = tf.keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm_1")(x)
        y = MultiHeadSelfAttention(heads, name=f"block{i}_attention",
                                   **quantizers("attention"))(y)
        x = tf.keras.layers.Add(name=f"block{i}_add_1")([x, y])
        y = tf.keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm_2")(x)
        y = QuantDense(mlp_dim, name=f"block{i}_mlp_1", **quantizers("mlp"))(y)
        y = TanhGELU(name=f"block{i}_gelu")(y)
        y = QuantDense(dim, name=f"block{i}_mlp_2", **quantizers("mlp"))(y)
        x = tf.keras.layers.Add(name=f"block{i}_add_2")([x, y])
    x = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="norm")(x)
    if pool == "class":
        x = tf.keras.layers.Cropping1D((0, x.shape[1] - 1), name="class_output")(x)
        x = tf.keras.layers.Flatten(name="class_flat")(x)
    else:
        x = tf.keras.layers.GlobalAveragePooling1D(name="token_mean")(x)
    outputs = QuantDense(num_classes, name="head", **quantizers("head"))(x)
    return tf.keras.Model(inputs, outputs, name=name)
