"""One worker of test_distribute's MultiWorkerMirroredStrategy test (TF_CONFIG in the env).

Trains a QuantDense(ste_sign) with BinaryGradient(SGD, aggregation="sign_vote")
for a few steps on this worker's own examples and saves the start and final
kernels and its data to the .npz file named by argv[1].
"""

import json
import os
import sys

import larq_prox as lqp  # noqa: F401  (before tensorflow)

import numpy as np
import tensorflow as tf

STEPS, BATCH, LR = 3, 4, 0.05


def main(path: str) -> None:
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rng = np.random.default_rng(100 + index)
    x = rng.normal(size=(STEPS * BATCH, 6)).astype("float32")
    y = rng.integers(0, 3, len(x))

    def dataset(context):
        # One replica per worker: this pipeline's batches are this worker's shard.
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()

    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        model = tf.keras.Sequential([
            tf.keras.Input((6,)),
            lqp.layers.QuantDense(3, kernel_quantizer="ste_sign", use_bias=False),
        ])  # fmt: skip
        model.compile(
            lqp.optimizers.BinaryGradient(
                tf.keras.optimizers.legacy.SGD(LR), scale=None, aggregation="sign_vote"
            ),
            tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    kernel = model.layers[0].kernel
    start = kernel.latent_variable.numpy()
    model.fit(tf.keras.utils.experimental.DatasetCreator(dataset), epochs=1,
              steps_per_epoch=STEPS, verbose=0)
    np.savez(path, start=start, final=kernel.latent_variable.numpy(), lr=LR, steps=STEPS,
             x=x.reshape(STEPS, BATCH, 6), y=y.reshape(STEPS, BATCH))


if __name__ == "__main__":
    main(sys.argv[1])
