"""binarize(): a trained float model's binary fine-tuning start, or its PTB baseline.

```python
import larq_prox as lqp

float_vit = lqp.models.vit()                      # ... trained on the task
start = lqp.models.binarize(float_vit, "pcpp_bnn_plus_plus")       # fine-tune this
ptb = lqp.models.binarize(float_vit, "pcpp_bnn", post_training=True)   # no training
cnn = lqp.models.binarize(float_cnn, "pcpp_bnn", components=("conv", "mlp"))
```

The copy has the same layers, names and float weights; the chosen dense /
conv layers (and a ViT's attention projections) get the PC++ pair as kernel
quantizer (and as input quantizer with `activations=True`), their latent
weights copied exactly from the float weights (the PC++ paper's fine-tuning
start). Float `Dense` / `Conv2D` become larq-prox's `QuantDense` /
`QuantConv2D` (larq's layers plus the low-memory training path).
`post_training=True` gives post-training binarization (PTB): the same layers
with the pair in hard mode (`hard=True`: sign forward always), for
evaluation without training: its outputs equal the fine-tuning start's
inference outputs.

Components (`COMPONENTS`): a ViT's (`lqp.models.vit`, by layer name)
"embedding" (patch embedding), "attention", "mlp", "head"; other models'
weight layers: the first is "embedding" (the stem), the last dense layer
"head", the others "conv" or "mlp" (dense). Blocks: a ViT's encoder blocks;
in other models each weight layer between stem and head is one block.
"""

from __future__ import annotations

from collections.abc import Sequence

import larq as lq
import tensorflow as tf

from larq_prox import quantizers as pcpp_quantizers
from larq_prox.layers.attention import MultiHeadSelfAttention
from larq_prox.layers.binary import QuantConv2D, QuantDense
from larq_prox.memory.census import quantizer_variable_ids
from larq_prox.models.convert import map_layers
from larq_prox.models.vit import component_of

__all__ = ["COMPONENTS", "binarize", "binarizable_layers"]

COMPONENTS = ("embedding", "attention", "mlp", "conv", "head")
"""Components `binarize` can select (which exist depends on the model)."""

_DENSE = (tf.keras.layers.Dense, lq.layers.QuantDense)
_CONV = (tf.keras.layers.Conv2D, lq.layers.QuantConv2D)
# Subclasses of Conv2D that are not a plain convolution.
_NOT_CONV = (tf.keras.layers.DepthwiseConv2D, tf.keras.layers.Conv2DTranspose,
             tf.keras.layers.SeparableConv2D)


def _leaf_layers(model):
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def _is_weight_layer(layer) -> bool:
    if isinstance(layer, MultiHeadSelfAttention) or isinstance(layer, _DENSE):
        return True
    return isinstance(layer, _CONV) and not isinstance(layer, _NOT_CONV)


def binarizable_layers(model: tf.keras.Model) -> dict[str, tuple[int | None, str]]:
    """layer name -> (block, component) of every layer `binarize` can binarize.

    ```python
    lqp.models.binarizable_layers(vit)    # {"patch_embedding": (None, "embedding"), ...}
    ```
    """
    layers = [layer for layer in _leaf_layers(model) if _is_weight_layer(layer)]
    if not layers:
        raise ValueError(
            f"Model {model.name!r} has no dense or conv layers to binarize: binarize() "
            "binarizes Dense, Conv2D, larq QuantDense / QuantConv2D and "
            "MultiHeadSelfAttention layers."
        )
    named = {layer.name: component_of(layer.name) for layer in layers}
    if any(component == "attention" for _, component in named.values()):
        return {name: bc for name, bc in named.items() if bc[1] is not None}
    # Not a ViT: stem, middle layers (one block each), head.
    head = layers[-1] if isinstance(layers[-1], _DENSE) and len(layers) > 1 else None
    found, block = {}, 0
    for i, layer in enumerate(layers):
        if i == 0:
            found[layer.name] = (None, "embedding")
        elif layer is head:
            found[layer.name] = (None, "head")
        else:
            found[layer.name] = (block, "mlp" if isinstance(layer, _DENSE) else "conv")
            block += 1
    return found


def _selected(found, components, blocks) -> set[str]:
    if isinstance(components, str):
        components = (components,)
    components = tuple(components)
    present = tuple(c for c in COMPONENTS if any(bc[1] == c for bc in found.values()))
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(
            f"Unknown component(s) {unknown}: `components` must be a subset of {COMPONENTS}; "
            f"this model has {present}."
        )
    missing = [c for c in components if c not in present]
    if missing or not components:
        raise ValueError(
            f"This model has no {missing or 'selected'} layers: its components are {present}."
        )
    n_blocks = len({b for b, _ in found.values() if b is not None})
    if blocks is not None:
        if isinstance(blocks, int):
            blocks = (blocks,)
        blocks = tuple(blocks)
        bad = [b for b in blocks
               if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < n_blocks]
        if bad or not blocks:
            raise ValueError(
                f"`blocks` {list(blocks)}: block(s) {bad or '(none)'} out of range; this model "
                f"has {n_blocks} blocks, numbered 0 to {n_blocks - 1}."
            )
    return {
        name for name, (block, component) in found.items()
        if component in components
        and (block is None or blocks is None or block in blocks)
        and (block is not None or blocks is None or component in ("embedding", "head"))
    }


def _quantizer_spec(quantizer, hard: bool):
    try:
        instance = pcpp_quantizers.get(quantizer)
    except ValueError as error:
        raise ValueError(f"`quantizer`: {error}") from error
    if instance is None or getattr(instance, "precision", None) != 1:
        raise ValueError(
            f"`quantizer` must be a binary quantizer (precision 1) such as "
            f"'pcpp_bnn_plus_plus', got {quantizer!r}."
        )
    if hard:
        if not isinstance(instance, pcpp_quantizers.PCPPQuantizer):
            raise ValueError(
                f"post_training=True needs a PC++ pair (it switches the pair to its hard "
                f"sign), got {quantizer!r}; use e.g. 'pcpp_bnn'."
            )
        instance = type(instance).from_config({**instance.get_config(), "hard": True})
    return lq.quantizers.serialize(instance)


def _binary_twin(layer, spec, activations: bool, image_input: bool):
    config = layer.get_config()
    config["kernel_quantizer"] = spec
    if activations and not image_input:
        config["input_quantizer"] = spec
    if isinstance(layer, MultiHeadSelfAttention):
        return type(layer).from_config(config)
    target = QuantDense if isinstance(layer, _DENSE) else QuantConv2D
    if isinstance(layer, (QuantDense, QuantConv2D)):
        target = type(layer)
    # A Dense / Conv2D config (also larq-prox's, with saved_dtype) is a valid
    # QuantDense / QuantConv2D config.
    return target.from_config(config)


def _copy_weights(old, new) -> None:
    """Latent weights of `new` = weights of `old`, matched by name (quantizer variables aside)."""
    skip = quantizer_variable_ids(new)

    def names(layer, variables):
        prefix = layer.name + "/"
        return {v.name[len(prefix):] if v.name.startswith(prefix) else v.name: v
                for v in variables}

    source = names(old, [v for v in old.weights if id(v) not in quantizer_variable_ids(old)])
    target = names(new, [v for v in new.weights if id(v) not in skip])
    if set(source) != set(target):
        raise ValueError(
            f"{old.name}: the binary copy's weights {sorted(target)} do not match the "
            f"original's {sorted(source)}."
        )
    for name, variable in target.items():
        variable.assign(tf.cast(source[name], variable.dtype))


def binarize(
    model: tf.keras.Model,
    quantizer="pcpp_bnn_plus_plus",
    components: Sequence[str] = ("attention", "mlp"),
    blocks: Sequence[int] | None = None,
    activations: bool = False,
    post_training: bool = False,
) -> tf.keras.Model:
    """A copy of `model` whose chosen layers are binary, latent weights = the float weights.

    ```python
    start = lqp.models.binarize(float_vit, "pcpp_bnn", components=("mlp",), blocks=[0, 1])
    ```

    # Arguments
        model: a built Sequential or functional model (a ViT, a CNN, ...).
        quantizer: the PC++ pair (alias or quantizer object) for the kernels.
        components: which parts to binarize (see the module docstring).
        blocks: encoder blocks to binarize (None: all); "embedding" and "head"
            are binarized only when `blocks` is None.
        activations: the pair as input quantizer too (not on a float-image stem).
        post_training: PTB: the pair in hard mode, for evaluation without training.

    # Raises
        ValueError: unknown component (the error names the choices), a block
        out of range, a model without dense or conv layers, a non-binary quantizer.
    """
    if not isinstance(model, tf.keras.Model) or not model.built:
        raise ValueError("`model` must be a built tf.keras.Model (give it an input shape).")
    found = binarizable_layers(model)
    chosen = _selected(found, components, blocks)
    spec = _quantizer_spec(quantizer, post_training)
    pairs = []

    def clone(layer):
        if layer.name in chosen:
            image_input = found[layer.name][1] == "embedding"
            new = _binary_twin(layer, spec, activations, image_input)
        else:
            new = type(layer).from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    copy = map_layers(model, clone)
    for old, new in pairs:
        if old.name in chosen:
            _copy_weights(old, new)
        elif old.weights:
            new.set_weights(old.get_weights())
    return copy
