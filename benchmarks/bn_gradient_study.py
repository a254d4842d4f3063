r"""Batch normalization and exploding gradients in binary and ternary networks.

Tests the prediction of Sari & Partovi Nia, "Batch normalization in quantized
networks" (2020) (and Sari et al., "How does batch normalization help binary
training?"): without BN the variance of \(\partial L/\partial s^l\) (the gradient
with respect to a layer's pre-activation) grows backward like the product of
the widths times the weight variance; with BN it grows like the product of the
width ratios \(K_{l+1}/K_{l-1}\), so it stays flat for constant widths.

The per-layer law measured here (mean-field, one layer back, l -> l-1):

    no BN:   Var g^l / Var g^{l+1} = K_{l+1} q_{l+1} E[f'(s^l)^2]
    with BN: Var g^l / Var g^{l+1} = (K_{l+1} / K_{l-1}) (q_{l+1} / q_l) c_f

with q_l = E[(w^l)^2] of the (quantized) kernel (1 for binary weights) and
c_f = E[f'(x)^2] / (kappa Var f(x)), x ~ N(0, 1/kappa), kappa = 1 (l2 BN) or
2/pi (l1 BN, whose scale is the mean absolute deviation). The paper's K ratio
is this law with c_f = 1; c_f is a property of the activation (ReLU:
pi/(pi-1) for l2 BN, the known BN-ReLU gradient growth; sign with straight-
through estimator: P(|x| <= 1)/kappa).

Networks: Fashion-MNIST (real, 784 inputs scaled to [-1, 1]) -> L hidden
QuantDense layers -> QuantDense(10) logits, each weight layer followed by the
normalization under study; activations ReLU or sign (larq `ste_sign` input
quantizer of the next layer). Weights: full precision (Glorot), binary
(`pcpp_bnn`: sign forward) or ternary (larq `SteTern`, threshold 0.7 E|w|).
Measured with `larq_prox.callbacks.gradient_variances` at initialization and
after a few Adam steps, over several seeds; a short `fit` shows the
`GradientStats` callback on the same question.

    PYTHONPATH=. python benchmarks/bn_gradient_study.py      # ~3 min on 2 cores

Writes benchmarks/results/bn_gradient_study.{json,md} and PNG figures.
"""

import larq_prox as lqp  # noqa: I001  (selects legacy Keras before TensorFlow)

import argparse
import gzip
import json
import math
import os
import platform
import time
from pathlib import Path

import larq as lq
import numpy as np
import tensorflow as tf

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTS = ("full", "binary", "ternary")
NORMS = ("none", "l2", "l1")
ACTIVATIONS = ("relu", "ste_sign")


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def load_fashion_mnist(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """First n training images (flattened, scaled to [-1, 1]) and labels, read
    directly from the IDX files; Gaussian inputs and random labels if absent."""
    images = FASHION_DIR / "train-images-idx3-ubyte.gz"
    labels = FASHION_DIR / "train-labels-idx1-ubyte.gz"
    if not (images.exists() and labels.exists()):
        rng = np.random.default_rng(0)
        return rng.normal(size=(n, 784)).astype("float32"), rng.integers(0, 10, n), "gaussian"
    with gzip.open(images) as handle:
        x = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 784)[:n]
    with gzip.open(labels) as handle:
        y = np.frombuffer(handle.read(), np.uint8, offset=8)[:n]
    return (x.astype("float32") / 127.5 - 1.0), y.astype("int64"), "fashion_mnist"


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


class L1BatchNorm(tf.keras.layers.Layer):
    """Benchmark-local l1 batch normalization (used when
    `larq_prox.layers.BinaryBatchNorm` is not available yet).

    Forward as DESIGN.md section 5: mu = mean(y), psi = mean|y - mu| + eps,
    x = (y - mu) / psi + beta; the backward pass is autodiff of this forward
    (BinaryBatchNorm's mode="exact").
    """

    def __init__(self, momentum: float = 0.99, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.momentum, self.epsilon = momentum, epsilon

    def build(self, input_shape):
        units = int(input_shape[-1])
        self.beta = self.add_weight("beta", (units,), initializer="zeros")
        statistic = dict(shape=(units,), trainable=False)
        self.moving_mean = self.add_weight("moving_mean", initializer="zeros", **statistic)
        self.moving_psi = self.add_weight("moving_psi", initializer="ones", **statistic)

    def call(self, inputs, training=None):
        if training:
            mean = tf.reduce_mean(inputs, axis=0)
            psi = tf.reduce_mean(tf.abs(inputs - mean), axis=0) + self.epsilon
            self.moving_mean.assign(self.momentum * self.moving_mean + (1 - self.momentum) * mean)
            self.moving_psi.assign(self.momentum * self.moving_psi + (1 - self.momentum) * psi)
        else:
            mean, psi = self.moving_mean, self.moving_psi
        return (inputs - mean) / psi + self.beta


def l1_norm_layer():
    """(factory, label) of the l1 BN used: larq-prox's if importable."""
    try:
        from larq_prox.layers import BinaryBatchNorm
    except ImportError:
        return L1BatchNorm, "benchmark-local L1BatchNorm (autodiff of the l1 forward, DESIGN.md 5)"
    return BinaryBatchNorm, "larq_prox.layers.BinaryBatchNorm (default mode)"


def kernel_quantizer(weights: str):
    if weights == "full":
        return None
    if weights == "binary":
        return "pcpp_bnn"
    return lq.quantizers.SteTern(ternary_weight_networks=True)


def build_model(widths, weights: str, norm: str, activation: str, l1_layer, seed: int):
    tf.keras.utils.set_random_seed(seed)
    # Functional, not Sequential: Sequential rebuilds its graph at every add.
    inputs = tf.keras.Input((784,))
    layers = []
    units = [*widths, 10]
    for index, k in enumerate(units):
        layers.append(
            lq.layers.QuantDense(
                k,
                # Sign activations are the next layer's input quantizer (larq's idiom).
                input_quantizer="ste_sign" if activation == "ste_sign" and index > 0 else None,
                kernel_quantizer=kernel_quantizer(weights),
                kernel_constraint=None if weights == "full" else "weight_clip",
                use_bias=False,
                name=f"dense_{index + 1}",
            )
        )
        if norm == "l2":
            layers.append(tf.keras.layers.BatchNormalization(name=f"bn_{index + 1}"))
        elif norm == "l1":
            layers.append(l1_layer(name=f"bn_{index + 1}"))
        if activation == "relu" and index < len(units) - 1:
            layers.append(tf.keras.layers.ReLU())
    outputs = inputs
    for layer in layers:
        outputs = layer(outputs)
    model = tf.keras.Model(inputs, outputs)
    # Initial values of everything but the kernels (BN parameters, statistics).
    model.initial_values = [v.numpy() for v in model.variables]
    return model


def reinitialize(model, seed: int) -> None:
    """A fresh draw of every kernel (its own initializer, seeded), every other
    variable back to its initial value: one traced model serves all seeds."""
    for variable, value in zip(model.variables, model.initial_values):
        variable.assign(value)
    # Explicitly seeded initializers: changing the global seed instead would make
    # every traced function re-instantiate (seconds per call).
    for index, layer in enumerate(lqp.callbacks.weight_layers(model).values()):
        config = {**layer.kernel_initializer.get_config(), "seed": 1000 * seed + index}
        initializer = type(layer.kernel_initializer).from_config(config)
        layer.kernel.assign(initializer(layer.kernel.shape))


# --------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------

_Z = np.linspace(-12.0, 12.0, 240001)
_PHI = np.exp(-0.5 * _Z**2) / math.sqrt(2 * math.pi)


def _gauss(fn, std: float) -> float:
    """E[fn(x)], x ~ N(0, std^2), by quadrature."""
    return float(np.trapz(fn(std * _Z) * _PHI, _Z))


def activation_moments(activation: str, std: float) -> tuple[float, float]:
    """(E[f'(x)^2], Var f(x)) for x ~ N(0, std^2); sign uses the STE derivative 1{|x|<=1}."""
    if activation == "relu":
        fp2 = _gauss(lambda x: (x > 0).astype(float), std)
        mean = _gauss(lambda x: np.maximum(x, 0), std)
        var = _gauss(lambda x: np.maximum(x, 0) ** 2, std) - mean**2
    else:
        fp2 = _gauss(lambda x: (np.abs(x) <= 1).astype(float), std)
        var = 1.0
    return fp2, var


def forward_kernel(layer) -> np.ndarray:
    """The kernel the forward pass uses (quantized if the layer quantizes it)."""
    with lq.context.quantized_scope(True):
        return tf.convert_to_tensor(layer.kernel).numpy().astype(np.float64)


def _log_rademacher_window(n: np.ndarray) -> np.ndarray:
    """ln P(|S_n| <= 1) for S_n a sum of n independent uniform signs.

    S_n has the parity of n: the window holds S_n = 0 (n even) or S_n = +-1
    (n odd, twice the mass of one point).
    """
    n = np.asarray(n, dtype=np.float64)
    k = np.floor(n / 2)
    log_point = np.array([math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)
                          for a, b in zip(n, k)]) - n * math.log(2)
    return log_point + np.where(n % 2 == 1, math.log(2), 0.0)


def ste_window_probability(kernel: np.ndarray, lattice: bool = True) -> float:
    """P(|s| <= 1) for s = w . a, a uniform random signs, averaged over units.

    This is E[f'(s)^2] of the straight-through sign without BN. For kernels in
    {-1, 0, 1} (binary, ternary) s is an integer and `lattice=True` counts it
    exactly per unit (from the unit's number of non-zero weights); otherwise
    s is taken Gaussian with variance sum_j w_j^2.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    if lattice and np.all(np.isin(kernel, (-1.0, 0.0, 1.0))):
        return float(np.mean(np.exp(_log_rademacher_window(np.count_nonzero(kernel, axis=0)))))
    std = np.sqrt(np.sum(kernel**2, axis=0))
    return float(np.mean([math.erf(1 / (s * math.sqrt(2))) for s in std]))


def predicted_log_ratios(widths, q, norm, activation, input_trace, input_sq, windows=None):
    """r_l = ln Var g^l - ln Var g^{l+1} for l = 1..L (K_{L+1} = 10 logits).

    `input_trace` = sum over input features of their batch variance (what BN of
    the first layer normalizes by), `input_sq` = sum of their mean squares
    (the first pre-activation's second moment without BN). `windows[l]`, if
    given, is E[f'(s^l)^2] of the sign activation without BN for layers with
    sign inputs (`ste_window_probability`); by default s^l is taken Gaussian.
    """
    units = [*widths, 10]  # K_1..K_{L+1}
    ratios = []
    if norm == "none":
        second = q[0] * input_sq  # E[(s^1)^2]
        for l in range(len(widths)):  # layer l+1 in 1-based terms
            if activation == "relu":
                fp2 = 0.5
                a_sq = second / 2  # E[relu(s)^2]
            elif windows is not None and l > 0:
                fp2, a_sq = windows[l], 1.0
            else:
                fp2 = _gauss(lambda x: (np.abs(x) <= 1).astype(float), math.sqrt(second))
                a_sq = 1.0
            ratios.append(math.log(units[l + 1] * q[l + 1] * fp2))
            second = units[l] * q[l + 1] * a_sq
        return ratios
    kappa = 1.0 if norm == "l2" else 2.0 / math.pi
    fp2, var_f = activation_moments(activation, 1.0 / math.sqrt(kappa))
    for l in range(len(widths)):
        # d_l^2 = kappa Var(s^l); Var(s^l) = q_l * (sum of the inputs' variances)
        trace = input_trace if l == 0 else units[l - 1] * var_f
        ratios.append(math.log(units[l + 1] * q[l + 1] * fp2 / (kappa * q[l] * trace)))
    return ratios


def slope(values, first: int, last: int) -> float:
    """Least-squares slope of values[first:last+1] against the layer index."""
    layers = np.arange(first, last + 1)
    return float(np.polyfit(layers, np.asarray(values)[first : last + 1], 1)[0])


# --------------------------------------------------------------------------
# Study
# --------------------------------------------------------------------------


class Case:
    """One network, built once and re-initialized for each seed.

    Everything runs eagerly: tracing a 13-layer larq model costs more CPU time
    (several seconds per function) than the few measurements and steps per seed.
    """

    def __init__(self, widths, weights, norm, activation, l1_layer, loss, learning_rate):
        self.widths, self.activation, self.norm, self.loss = widths, activation, norm, loss
        self.model = build_model(widths, weights, norm, activation, l1_layer, seed=0)
        self.optimizer = tf.keras.optimizers.legacy.Adam(learning_rate)

    def train_step(self, x, y) -> float:
        model = self.model
        with tf.GradientTape() as tape:
            value = tf.reduce_mean(self.loss(y, model(x, training=True)))
        grads = tape.gradient(value, model.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return float(value)

    def log_variances(self, x, y) -> tuple[list[float], list[float]]:
        stats = lqp.callbacks.gradient_variances(self.model, x, y, loss=self.loss)
        return [math.log(v) for v in stats["s"].values()], [
            math.log(v) for v in stats["w"].values()
        ]

    def run(self, seed, data, batch, steps) -> dict:
        x, y = data
        order = np.random.default_rng(seed).permutation(len(x))
        ref = order[:batch]
        xr, yr = x[ref], y[ref]
        reinitialize(self.model, seed)
        for variable in self.optimizer.variables():  # fresh Adam state per seed
            variable.assign(tf.zeros_like(variable))
        layers = lqp.callbacks.weight_layers(self.model).values()
        kernels = [forward_kernel(layer) for layer in layers]
        q = [float(np.mean(k**2)) for k in kernels]  # q_l = E[(w^l)^2]
        log_s, log_w = self.log_variances(tf.constant(xr), tf.constant(yr))
        input_trace = float(np.sum(np.var(xr.astype(np.float64), axis=0)))
        input_sq = float(np.sum(np.mean(xr.astype(np.float64) ** 2, axis=0)))
        windows = {
            lattice: [ste_window_probability(k, lattice) for k in kernels]
            for lattice in (True, False)
        }
        predicted = {}
        for name, window in (("predicted", windows[True]), ("predicted_gaussian", windows[False])):
            ratios = predicted_log_ratios(
                self.widths, q, self.norm, self.activation, input_trace, input_sq, window
            )
            # Anchored at the logits' measured value and propagated backward.
            curve = [log_s[-1]]
            for r in reversed(ratios):
                curve.insert(0, curve[0] + r)
            predicted[name] = curve
        for i in range(steps):
            index = order[batch * (i + 1) : batch * (i + 2)]
            final_loss = self.train_step(tf.constant(x[index]), tf.constant(y[index]))
        log_s_after, log_w_after = self.log_variances(tf.constant(xr), tf.constant(yr))
        return {
            "seed": seed,
            "q": q,
            "log_var_s_init": log_s,
            "log_var_w_init": log_w,
            "log_var_s_after": log_s_after,
            "log_var_w_after": log_w_after,
            "log_var_s_predicted": predicted["predicted"],
            "log_var_s_predicted_gaussian": predicted["predicted_gaussian"],
            "loss_after": final_loss if steps else None,
        }


def width_patterns(depth: int) -> dict[str, list[int]]:
    return {
        "constant": [256] * depth,
        "alternating": [128 if i % 2 == 0 else 512 for i in range(depth)],
        "growing": [int(round(64 * 1.25**i)) for i in range(depth)],
    }


def summarize(case: dict, depth: int) -> dict:
    """Slopes of ln Var(dL/ds^l) against l over the interior layers 2..L
    (excluding the 784-input first layer and the 10-unit logits)."""
    first, last = 1, depth - 1  # 0-based indices of layers 2..L
    out = {}
    for key in ("init", "after", "predicted", "predicted_gaussian"):
        per_seed = [slope(run[f"log_var_s_{key}"], first, last) for run in case["runs"]]
        out[f"slope_{key}"] = float(np.mean(per_seed))
        out[f"slope_{key}_sd"] = float(np.std(per_seed))
        total = [run[f"log_var_s_{key}"][0] - run[f"log_var_s_{key}"][-1] for run in case["runs"]]
        out[f"log_ratio_first_to_logits_{key}"] = float(np.mean(total))
    gaps = [
        np.mean(np.abs(np.subtract(run["log_var_s_init"], run["log_var_s_predicted"])[:-1]))
        for run in case["runs"]
    ]
    out["mean_abs_gap_init"] = float(np.mean(gaps))
    return out


def callback_demo(data, args, l1_layer, loss) -> dict:
    """GradientStats during fit: binary weights, sign activations, constant width."""
    x, y = data
    xr, yr = x[: args.batch], y[: args.batch]
    demo = {}
    for norm in ("none", "l2"):
        model = build_model([256] * args.depth, "binary", norm, "ste_sign", l1_layer, seed=0)
        model.compile(tf.keras.optimizers.legacy.Adam(args.learning_rate), loss)
        stats = lqp.callbacks.GradientStats(data=(xr, yr), every=args.demo_every)
        history = model.fit(
            x[args.batch :], y[args.batch :], batch_size=args.batch,
            steps_per_epoch=args.demo_steps // 2, epochs=2, callbacks=[stats], verbose=0,
        )
        first, last = "dense_1", f"dense_{args.depth + 1}"
        demo[norm] = {
            "steps": [r["step"] for r in stats.records],
            "log_var_s_first": [math.log(r[f"grad_var_s/{first}"]) for r in stats.records],
            "log_var_s_logits": [math.log(r[f"grad_var_s/{last}"]) for r in stats.records],
            "log_var_w_first": [math.log(r[f"grad_var_w/{first}"]) for r in stats.records],
            "loss": history.history["loss"],
            "history_keys": sorted(k for k in history.history if k.startswith("grad_var_s/"))[:3],
        }
    return demo


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

COLORS = {"full": "tab:blue", "binary": "tab:red", "ternary": "tab:green"}


def plot(results, patterns, depth, out_dir) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    layers = np.arange(1, depth + 2)
    for activation in ACTIVATIONS:
        fig, axes = plt.subplots(3, 3, figsize=(13, 10), sharex=True)
        for row, norm in enumerate(NORMS):
            for col, pattern in enumerate(patterns):
                ax = axes[row, col]
                for weights in WEIGHTS:
                    case = results[f"{activation}/{weights}/{norm}/{pattern}"]
                    for key, style, label in (
                        ("init", "-", "init"),
                        ("after", ":", "after steps"),
                        ("predicted", "--", "predicted"),
                    ):
                        curves = np.array([run[f"log_var_s_{key}"] for run in case["runs"]])
                        mean = curves.mean(axis=0)
                        ax.plot(layers, mean, style, color=COLORS[weights],
                                label=f"{weights} {label}" if row == col == 0 else None)
                        if key == "init":
                            ax.fill_between(layers, curves.min(0), curves.max(0),
                                            color=COLORS[weights], alpha=0.15)
                ax.set_title(f"{activation}, BN={norm}, widths {pattern}", fontsize=9)
                if col == 0:
                    ax.set_ylabel("ln Var(dL/ds^l)")
                if row == 2:
                    ax.set_xlabel("layer l (logits last)")
        fig.legend(loc="upper center", ncol=3, fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.94))
        path = out_dir / f"bn_gradient_study_{activation}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(str(path))
    return files


def plot_demo(demo, out_dir) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for norm, style in (("none", "-"), ("l2", "--")):
        ax.plot(demo[norm]["steps"], demo[norm]["log_var_s_first"], style, color="tab:red",
                label=f"BN={norm}: layer 1")
        ax.plot(demo[norm]["steps"], demo[norm]["log_var_s_logits"], style, color="tab:gray",
                label=f"BN={norm}: logits layer")
    ax.set_xlabel("training step")
    ax.set_ylabel("ln Var(dL/ds^l)")
    ax.set_title("GradientStats during fit: binary weights, sign activations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "bn_gradient_study_fit.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def write_markdown(report, path):
    s = report["summary"]
    lines = [
        "# Batch normalization and gradient variance in quantized networks",
        "",
        f"Command: `{report['command']}` ({report['seconds']:.0f} s wall, "
        f"{report.get('cpu_seconds', float('nan')):.0f} s CPU, {report['machine']}, "
        "shared with other jobs).",
        f"Data: {report['data']} ({report['config']['batch']} samples per measurement), "
        f"{report['config']['depth']} hidden QuantDense layers + 10 logits, "
        f"{len(report['config']['seeds'])} seeds, measured at initialization and after "
        f"{report['config']['steps']} Adam steps (lr {report['config']['learning_rate']}).",
        f"l1 BN: {report['l1_implementation']}.",
        "",
        "Slope = least-squares slope of ln Var(dL/ds^l) against l over layers 2..L "
        "(negative: the variance grows toward the input). Predicted: the same fit of "
        "the mean-field curve (module docstring) built from the widths, the measured "
        "kernel second moments q_l and the activation constant c_f. 'gap' = mean "
        "|measured - predicted| over layers 1..L in nats, the prediction anchored at the logits.",
        "",
        "| activation | weights | BN | widths | slope init | slope predicted | (Gaussian s) "
        "| slope after steps | gap (nats) | ln Var g^1/g^logits |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in s.items():
        activation, weights, norm, pattern = key.split("/")
        lines.append(
            f"| {activation} | {weights} | {norm} | {pattern} | {row['slope_init']:.3f} "
            f"± {row['slope_init_sd']:.3f} | {row['slope_predicted']:.3f} | "
            f"{row['slope_predicted_gaussian']:.3f} | {row['slope_after']:.3f} | "
            f"{row['mean_abs_gap_init']:.2f} | {row['log_ratio_first_to_logits_init']:.1f} |"
        )
    lines += ["", "## Findings", ""] + report["findings"] + [""]
    lines += [
        "## The law being tested",
        "",
        "One layer back (l+1 -> l), with q_l = E[(w^l)^2] of the kernel used forward "
        "(binary: 1) and f the activation:",
        "",
        "- no BN: Var g^l / Var g^(l+1) = K_(l+1) q_(l+1) E[f'(s^l)^2]: the variance grows "
        "like the product of the widths times the weight variance;",
        "- BN: Var g^l / Var g^(l+1) = (K_(l+1) / K_(l-1)) (q_(l+1) / q_l) c_f, "
        "c_f = E[f'(x)^2] / (kappa Var f(x)), x ~ N(0, 1/kappa), kappa = 1 (l2) or 2/pi (l1): "
        "the paper's width ratio, times an activation constant (c_f = "
        + ", ".join(f"{k} {v:.3f}" for k, v in report["activation_constant_c"].items())
        + "). For binary or ternary weights q_(l+1)/q_l = 1, so only the widths and f matter.",
        "",
    ]
    lines += ["## GradientStats during fit", ""] + report["demo_lines"] + [""]
    lines += ["Figures: " + ", ".join(report["figures"]), ""]
    Path(path).write_text("\n".join(lines))


def findings(summary, c_values) -> list[str]:
    """Statements computed from the numbers (no hand-written figures)."""

    def keys(activation=None, weights=None, norm=None, pattern=None, quantized=False):
        wanted = (activation, weights, norm, pattern)
        return [
            k for k in summary
            if all(w is None or part == w for part, w in zip(k.split("/"), wanted))
            and not (quantized and k.split("/")[1] == "full")
        ]

    def span(values, digits=2):
        return f"{min(values):.{digits}f} to {max(values):.{digits}f}"

    out = []
    for activation in ACTIVATIONS:
        none = keys(activation, norm="none", quantized=True)
        with_bn = [k for k in keys(activation, quantized=True) if k not in none]
        closest = max(abs(summary[k]["log_ratio_first_to_logits_init"]) for k in with_bn)
        out.append(
            f"- Explosion without BN ({activation}, binary/ternary weights): ln Var(dL/ds^l) "
            f"falls by {span([-summary[k]['slope_init'] for k in none])} nats per layer from "
            f"the input to the output, so layer 1's gradient variance is "
            f"e^{span([summary[k]['log_ratio_first_to_logits_init'] for k in none], 1)} times "
            f"the logits'. With BN (l2 or l1) the slope is "
            f"{span([summary[k]['slope_init'] for k in with_bn])} nats per layer and layer 1 "
            f"is within e^{closest:.1f} of the logits."
        )
    errors = {k: summary[k]["slope_init"] - summary[k]["slope_predicted"] for k in summary}
    gaps = [v["mean_abs_gap_init"] for v in summary.values()]
    out.append(
        f"- Law vs measurement: the predicted slope is within 0.1 nats/layer of the measured "
        f"one in {sum(abs(e) <= 0.1 for e in errors.values())} of {len(errors)} cases "
        f"(median |error| {np.median(np.abs(list(errors.values()))):.3f}, largest "
        f"{max(np.abs(list(errors.values()))):.3f}); median gap between the curves "
        f"{np.median(gaps):.2f} nats."
    )
    for activation in ACTIVATIONS:
        for norm in ("l2", "l1"):
            const = summary[f"{activation}/binary/{norm}/constant"]["slope_init"]
            alt = summary[f"{activation}/binary/{norm}/alternating"]["slope_init"]
            grow = summary[f"{activation}/binary/{norm}/growing"]["slope_init"]
            out.append(
                f"- Width ratio with BN ({activation}, binary, {norm}): slope constant widths "
                f"{const:.3f}, alternating 128/512 {alt:.3f} (K_(l+1)/K_(l-1) = 1, so predicted "
                f"equal), growing x1.25 {grow:.3f} (predicted {const:.3f} - ln 1.25^2 = "
                f"{const - 2 * math.log(1.25):.3f}). Constant widths are not flat: "
                f"ln c_f = {math.log(c_values[f'{activation}/{norm}']):.3f} per layer."
            )
    with_bn = [k for k in summary if "/none/" not in k]
    out.append(
        f"- Where it disagrees: with BN the measured slope is below the prediction in "
        f"{sum(errors[k] < 0 for k in with_bn)} of {len(with_bn)} cases, by "
        f"{span([-errors[k] for k in with_bn], 3)} nats/layer (mean "
        f"{-np.mean([errors[k] for k in with_bn]):.3f}): the gradient grows slightly faster "
        "toward the input than the first-order law says. The law drops the BN Jacobian's "
        "two projections and correlations between units; which of them causes the excess "
        "was not tested here. Without BN the errors are "
        f"{span([abs(errors[k]) for k in summary if k not in with_bn], 3)}."
    )
    lattice = keys("ste_sign", norm="none", quantized=True)
    gaussian = [
        abs(summary[k]["slope_init"] - summary[k]["slope_predicted_gaussian"]) for k in lattice
    ]
    out.append(
        "- Sign activations without BN need the lattice: with binary/ternary weights and "
        "+-1 inputs s^l is an integer, and the straight-through window |s| <= 1 holds one "
        "value (even fan-in) or two (odd fan-in; ternary: 1.5 on average). Counted exactly, "
        f"the slope errors are {span([abs(errors[k]) for k in lattice], 3)}; a Gaussian s misses "
        f"by {span(gaussian, 3)} nats/layer (ternary: ln 1.5 = 0.405)."
    )
    drift = [
        abs(v["slope_after"] - v["slope_init"]) for k, v in summary.items() if "/full/" not in k
    ]
    out.append(
        f"- After the Adam steps the slopes of binary/ternary networks moved by at most "
        f"{max(drift):.3f} nats/layer (median {np.median(drift):.3f}): the picture at "
        "initialization holds at the start of training."
    )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=8, help="hidden weight layers L")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--steps", type=int, default=3, help="Adam steps before the second measurement"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--demo-steps", type=int, default=40)
    parser.add_argument("--demo-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--report-only", type=Path, metavar="JSON",
        help="rewrite the figures and Markdown from a saved bn_gradient_study.json",
    )
    args = parser.parse_args(argv)
    if args.report_only:
        args.out.mkdir(parents=True, exist_ok=True)
        write_outputs(json.loads(args.report_only.read_text()), args.out)
        return
    if args.depth < 3:
        parser.error("--depth must be >= 3 (slopes are fitted over layers 2..L)")
    args.out.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.time(), time.process_time()

    n = args.batch * (args.steps + 1) * args.seeds + args.batch * args.demo_steps
    x, y, source = load_fashion_mnist(min(n, 60000))
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    l1_layer, l1_label = l1_norm_layer()
    patterns = width_patterns(args.depth)

    results = {}
    for activation in ACTIVATIONS:
        for weights in WEIGHTS:
            for norm in NORMS:
                for pattern, widths in patterns.items():
                    key = f"{activation}/{weights}/{norm}/{pattern}"
                    case = Case(
                        widths, weights, norm, activation, l1_layer, loss, args.learning_rate
                    )
                    runs = [
                        case.run(seed, (x, y), args.batch, args.steps)
                        for seed in range(args.seeds)
                    ]
                    results[key] = {"widths": widths, "runs": runs}
                    results[key].update(summarize(results[key], args.depth))
                    print(
                        f"{key:38s} slope init {results[key]['slope_init']:+.3f} "
                        f"predicted {results[key]['slope_predicted']:+.3f} after "
                        f"{results[key]['slope_after']:+.3f} "
                        f"gap {results[key]['mean_abs_gap_init']:.2f}"
                        f"  [{time.time() - start:.0f}s]",
                        flush=True,
                    )

    c_values = {}
    for activation in ACTIVATIONS:
        for norm, kappa in (("l2", 1.0), ("l1", 2 / math.pi)):
            fp2, var_f = activation_moments(activation, 1 / math.sqrt(kappa))
            c_values[f"{activation}/{norm}"] = fp2 / (kappa * var_f)

    demo = callback_demo((x, y), args, l1_layer, loss)
    summary = {
        k: {m: v for m, v in case.items() if m not in ("runs", "widths")}
        for k, case in results.items()
    }
    report = {
        "command": "PYTHONPATH=. python benchmarks/bn_gradient_study.py",
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "seeds": list(range(args.seeds)),
        },
        "data": source,
        "l1_implementation": l1_label,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, TF {tf.__version__}",
        "width_patterns": patterns,
        "activation_constant_c": c_values,
        "summary": summary,
        "cases": results,
        "callback_demo": demo,
        "seconds": time.time() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }
    write_outputs(report, args.out)
    print(f"done in {report['seconds']:.0f} s; results in {args.out}")


def write_outputs(report: dict, out: Path) -> None:
    """Findings, figures, JSON and Markdown from a report (also from a saved one)."""
    demo = report["callback_demo"]
    report["demo_lines"] = [
        f"- BN={norm}: ln Var(dL/ds) of layer 1 at steps {d['steps'][0]}..{d['steps'][-1]}: "
        f"{d['log_var_s_first'][0]:.1f} -> {d['log_var_s_first'][-1]:.1f} (logits layer "
        f"{d['log_var_s_logits'][0]:.1f} -> {d['log_var_s_logits'][-1]:.1f}); loss per epoch "
        f"{', '.join(f'{v:.3g}' for v in d['loss'])}."
        for norm, d in demo.items()
    ]
    depth = report["config"]["depth"]
    figures = plot(report["cases"], report["width_patterns"], depth, out)
    report["figures"] = [Path(f).name for f in figures + [plot_demo(demo, out)]]
    report["findings"] = findings(report["summary"], report["activation_constant_c"])
    (out / "bn_gradient_study.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, out / "bn_gradient_study.md")
    print("\n".join(report["findings"] + report["demo_lines"]))


if __name__ == "__main__":
    main()
