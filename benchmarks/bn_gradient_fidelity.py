"""How close is BinaryBatchNorm(proposed)'s bits-only backward to the exact l1 gradient?

BinaryResNetE18 (larq-zoo, `weights=None`) at 32x32 on real Fashion-MNIST,
converted with `batch_norm="l1"` (whose backward is the exact gradient of the
l1 forward). On one batch of 64 images, the gradients of every trainable
variable are computed with each BN's backward switched between "l1" (the
reference) and "proposed" with 0 (the paper), 1, 2 or 3 `magnitude_bits`;
the forward is the same in every case. Reported: cosine similarity to the
reference per variable (kernels and gammas) on one batch and of the
gradients summed over 4 batches (a consistent bias survives the sum, batch
noise does not), at initialization and after one epoch of training on
train[:3000] (l1, Adam 1e-3).

The proposed backward approximates one per-channel coefficient, mean(dx * x),
by omega * mean(dx * sign(x)); the gradient reaching a BN output is
concentrated where |x| is small (straight-through masks), so that estimate
is biased. Magnitude bits estimate |x| per element by its bin's mean.

    python benchmarks/bn_gradient_fidelity.py      # ~5 min on 2 cores

Writes benchmarks/results/bn_gradient_fidelity.json.
"""

import larq_prox as lqp  # noqa: I001  (selects legacy Keras before TensorFlow)

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

ROOT = Path(__file__).resolve().parents[1]
BITS = (0, 1, 2, 3)


def _data(split: str):
    def to_rgb32(x, y):
        x = tf.pad(x, [[0, 0], [2, 2], [2, 2], [0, 0]], constant_values=-1.0)
        return tf.repeat(x, 3, axis=-1), y

    return lqp.data.load("fashion_mnist", split, batch_size=64, seed=0).map(to_rgb32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-30))


def fidelity(model, bns, batches) -> dict:
    """Cosine of each variable's gradient to the l1 reference, per magnitude_bits: on the
    first batch, and of the gradients summed over all `batches` (what a consistent bias
    would show and per-batch noise would not)."""
    loss = tf.keras.losses.SparseCategoricalCrossentropy()

    def gradients(mode: str, bits: int, x, y) -> list[np.ndarray]:
        for layer in bns:
            layer.mode, layer.magnitude_bits = mode, bits
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        return [g.numpy() for g in tape.gradient(value, model.trainable_variables)]

    def summed(mode: str, bits: int = 0) -> tuple[list, list]:
        first, total = None, None
        for x, y in batches:
            grads = gradients(mode, bits, x, y)
            first = grads if first is None else first
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        return first, total

    reference, reference_sum = summed("l1")
    names = [v.name for v in model.trainable_variables]
    kernel = [i for i, n in enumerate(names) if "kernel" in n]
    gamma = [i for i, n in enumerate(names) if "gamma" in n]
    out = {}
    for bits in BITS:
        first, total = summed("proposed", bits)
        cosines = [_cosine(r, g) for r, g in zip(reference, first)]
        summed_cosines = [_cosine(r, g) for r, g in zip(reference_sum, total)]
        norms = [float(np.linalg.norm(total[i]) / np.linalg.norm(reference_sum[i])) for i in kernel]
        out[str(bits)] = {
            "kernel_cosine_mean": float(np.mean([cosines[i] for i in kernel])),
            "kernel_cosine_min": float(min(cosines[i] for i in kernel)),
            "gamma_cosine_mean": float(np.mean([cosines[i] for i in gamma])),
            "gamma_cosine_min": float(min(cosines[i] for i in gamma)),
            "summed_kernel_cosine_mean": float(np.mean([summed_cosines[i] for i in kernel])),
            "summed_kernel_cosine_min": float(min(summed_cosines[i] for i in kernel)),
            "summed_kernel_norm_ratio_range": [min(norms), max(norms)],
            "kernel_cosines": [cosines[i] for i in kernel],
        }
        row = out[str(bits)]
        print(f"  magnitude_bits={bits}: kernels cos mean {row['kernel_cosine_mean']:.4f} min "
              f"{row['kernel_cosine_min']:.4f}; gammas mean {row['gamma_cosine_mean']:.4f} min "
              f"{row['gamma_cosine_min']:.4f}; summed over {len(batches)} batches: kernels mean "
              f"{row['summed_kernel_cosine_mean']:.4f} min {row['summed_kernel_cosine_min']:.4f}, "
              f"norm ratio {min(norms):.3f}-{max(norms):.3f}", flush=True)
    for layer in bns:
        layer.mode, layer.magnitude_bits = "l1", 0
    return out


def main(argv=None) -> int:
    import larq_zoo as lqz

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "bn_gradient_fidelity.json")
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args(argv)
    tf.keras.utils.set_random_seed(0)
    model = lqz.literature.BinaryResNetE18(input_shape=(32, 32, 3), weights=None, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lqp.models.convert(model, batch_norm="l1")
    bns = [layer for layer in model.layers if isinstance(layer, lqp.layers.BinaryBatchNorm)]
    model.compile(tf.keras.optimizers.legacy.Adam(1e-3), "sparse_categorical_crossentropy")
    data = _data("train[:3000]")
    batches = list(data.take(args.batches))
    results = {"model": "BinaryResNetE18 (l1 BinaryBatchNorm, scale)", "input": "32x32x3",
               "batch_size": 64, "batches": args.batches, "batch_norms": len(bns), "reference": "mode='l1'"}
    print("initialization")
    results["initialization"] = fidelity(model, bns, batches)
    model.fit(data, epochs=1, verbose=0)
    print("after 1 epoch")
    results["after_1_epoch"] = fidelity(model, bns, batches)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
