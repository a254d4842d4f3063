r"""Fused C++ CPU kernels of the low-memory path, with the pure-TF ops as fallback.

The pure-TF ops (`larq_prox.bitpack`, `larq_prox.ops`, `BinaryBatchNorm`) are
the reference; these kernels compute the same in fewer passes over memory:

| kernel | replaces | passes |
|---|---|---|
| `l1_moments` | `reduce_mean`, chunked `sum abs(y - mean)` | 2 reads of y |
| `normalize_proposed` (forward) | normalize, chunked `sum abs(x)`, `pack_signs` | 1 read of y, 1 write of x (in y's buffer when free) |
| `normalize_proposed` (backward) | `unpack_signs`, `proposed_gradient`, `dbeta` | 2 reads of dx, 1 write of dy |
| `normalize_proposed(edges=...)` (`magnitude_bits`) | the bins of \|x\|, their bit planes and per-channel means; their unpacking in the backward | 1 more read of x forward; the planes read with the bits |
| `sign_and_pack` | `x >= 0`, `pack_bits`, `where` | 1 read, bits + signs written |
| `sign_pack_and_nan_rows` | the same plus `bitpack.nan_rows` and NaN signs for a sample holding a NaN | 1 read, bits + signs + flags written |
| `sign_pack_and_nan_rows(mask_bound=c)` | the same plus a clipped STE's mask `-c <= x <= c`, `pack_bits` | 1 read, and the mask bits written |
| `pack_bits`, `pack_signs`, `unpack_bits`, `unpack_signs` | `larq_prox.bitpack` (same signatures, same bits) | 1 |
| `pack_signs_and_nan` | `pack_signs` + `reduce_any(is_nan)` of a binary kernel | 1 |
| `apply_mask` | `unpack_bits` + `where` / multiply of a binary input's STE mask | 1 |
| `first_max_bits`, `unpool_bits` | `bitmask_max_pool2d`'s window mask and its scatter | 1 |
| `fused_apply_adam`, `fused_apply_momentum` | TF's `ResourceApplyAdam` / `ResourceApplyKerasMomentum` on a 16-bit (or float32) variable, with BinaryGradient's `sign(g) * scale` and a weight clip, see `larq_prox.fused_update` | 1 read of the variable, its slots and g; 1 write each |
| `argmax_max_pool`, `argmax_unpool` | `argmax_max_pool2d`'s max pool + offset scan + bit planes, and its unpack + int64 indices + `MaxPoolGradWithArgmax` | 1 read of x / of dy and the bits |

The library is compiled for the machine's instruction set (`-march=native`,
see `larq_prox.kernels.build`), and 16-bit elements are converted by
branch-free integer code (`src/lqp_numeric.h`): the loops over float16 and
bfloat16 tensors vectorize like those over float32.

Each public function runs its kernel when `use()` says so and the reference
otherwise, so callers switch by calling it. `use()` is False, with one log
line saying why, when `LARQ_PROX_KERNELS=0`, when the library cannot be built
or loaded (no compiler), inside an XLA cluster (`jit_compile=True`: XLA has
no kernel for custom ops) or when a GPU is visible (CPU kernels only). The
library is compiled on first use against the installed TensorFlow and cached
(`larq_prox.kernels.build`; `make install` builds it ahead).

Floats equal the reference within rounding: the kernels sum in blocks (float)
and then in double, TF in its own tree order, so means, psi, omega and the
gradients differ by a few ulp (relative 1e-5 in float32); element-wise
results from the same statistics (x, signs, masks, bits) are bit for bit.

```python
import larq_prox  # noqa: F401
import tensorflow as tf
from larq_prox import kernels

x = tf.random.normal((100, 32, 32, 128))
signs, bits = kernels.sign_and_pack(x)          # kernel if loaded, pure TF otherwise
kernels.use(x), kernels.reason()                # (True, None) with a compiler
```
"""

from __future__ import annotations

import logging
import os

import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # XLA context: no public API

from larq_prox import bitpack, prox

__all__ = [
    "ENV",
    "UPDATE_DTYPES",
    "apply_mask",
    "argmax_max_pool",
    "argmax_unpool",
    "available",
    "first_max_bits",
    "fused_apply_adam",
    "fused_apply_momentum",
    "l1_moments",
    "library",
    "normalize_proposed",
    "pack_bits",
    "in_xla_context",
    "pack_signs",
    "pack_signs_and_nan",
    "reason",
    "sign_and_pack",
    "sign_pack_and_nan_rows",
    "unpack_bits",
    "unpack_signs",
    "unpool_bits",
    "use",
]

ENV = "LARQ_PROX_KERNELS"
"""Environment variable: `0` forces the pure-TF ops (read at every graph build)."""

_log = logging.getLogger("larq_prox.kernels")

_XLA = (
    "inside an XLA cluster (jit_compile=True): XLA gives speed, not the memory saving; "
    "its scheduler ignores the low-memory ordering (BinaryNet B=100: 600 MiB peak vs 254 MiB "
    "in graph mode, standard larq 907 MiB); drop jit_compile for the saving"
)
_state: dict = {"tried": False, "library": None, "reason": None}
_said: set = set()

_BN_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
_FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
_HALF = (tf.float16, tf.bfloat16)
_UNPACK_DTYPES = (tf.bool, tf.uint8, tf.int32, *_FLOAT_DTYPES)
UPDATE_DTYPES = (tf.float16, tf.bfloat16, tf.float32)
"""Variable dtypes of the fused optimizer updates (float32: where they fold in a sign or a clip,
see `fused_update.worth_fusing`)."""


# Python decisions at graph-build time: nothing for autograph to convert.
@tf.autograph.experimental.do_not_convert
def _say_once(why: str) -> None:
    if why not in _said:
        _said.add(why)
        _log.warning("larq-prox kernels not used: %s; the pure-TF ops run.", why)


def library():
    """The loaded op library (building it on first call), or None; `reason()` says why."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            from larq_prox.kernels import build

            _state["library"] = tf.load_op_library(str(build.build()))
        except Exception as error:  # noqa: BLE001 - any failure means: run the fallback
            _state["reason"] = f"the library could not be built or loaded ({error})"
    return _state["library"]


def reason() -> str | None:
    """Why the library is not available (None when it is, or was not tried yet)."""
    return _state["reason"]


def in_xla_context() -> bool:
    """Whether the graph being built is compiled by XLA (e.g. `jit_compile=True`)."""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def available() -> bool:
    """Whether the kernels can run in this process (built, loaded, not switched off by ENV)."""
    off = os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off")
    return not off and library() is not None


@tf.autograph.experimental.do_not_convert
def use(*tensors: tf.Tensor, dtypes=_FLOAT_DTYPES) -> bool:
    """Whether the kernels run for these tensors here (else the pure-TF ops run).

    Logs once per reason why not.
    """
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        _say_once(f"{ENV}={os.environ[ENV]}")
        return False
    if any(t.dtype not in dtypes for t in tensors):
        return False  # a dtype without a kernel: quietly the reference
    if in_xla_context():
        _say_once(_XLA)
        return False
    devices = [t.device for t in tensors if getattr(t, "device", "")]
    if any("GPU" in d.upper() for d in devices) or (
        not any("CPU" in d.upper() for d in devices) and tf.config.list_logical_devices("GPU")
    ):
        _say_once("a GPU is visible (the kernels are CPU only)")
        return False
    if library() is None:
        _say_once(_state["reason"])
        return False
    return True


for _name in ("LqpL1Moments", "LqpSignAndPack", "LqpSignMaskAndPack", "LqpPackBits",
              "LqpUnpackBits", "LqpFirstMaxBits", "LqpArgmaxMaxPool"):
    tf.no_gradient(_name)


# ------------------------------------------------------------ bit packing
def pack_bits(mask: tf.Tensor) -> tf.Tensor:
    """`bitpack.pack_bits`: a boolean tensor as ceil(n / 8) bytes."""
    mask = tf.convert_to_tensor(mask)
    if use(mask, dtypes=(tf.bool,)):
        return library().lqp_pack_bits(mask)
    return bitpack.pack_bits(mask)


def pack_signs(x: tf.Tensor) -> tf.Tensor:
    """`bitpack.pack_signs`: the bits of `x >= 0`."""
    x = tf.convert_to_tensor(x)
    if use(x):
        return library().lqp_pack_signs(x)  # no signs written (sign_and_pack writes them)
    return bitpack.pack_signs(x)


def _unpack(packed, shape, dtype, on, off, reference):
    dtype = tf.as_dtype(dtype)
    packed = tf.convert_to_tensor(packed)
    if use(packed, dtypes=(tf.uint8,)) and dtype in _UNPACK_DTYPES:
        shape = tf.cast(tf.convert_to_tensor(shape), tf.int32)
        on, off = (tf.cast(v, dtype) for v in (on, off))
        return library().lqp_unpack_bits(packed, shape, on, off)
    return reference(packed, shape, dtype)


def unpack_bits(packed: tf.Tensor, shape, dtype=tf.bool) -> tf.Tensor:
    """`bitpack.unpack_bits`: the bits as a tensor of `shape` and `dtype` (0 / 1 or bool)."""
    return _unpack(packed, shape, dtype, True if dtype == tf.bool else 1,
                   False if dtype == tf.bool else 0, bitpack.unpack_bits)


def unpack_signs(packed: tf.Tensor, shape, dtype=tf.float32, nan=None) -> tf.Tensor:
    """`bitpack.unpack_signs`: the bits as +1 / -1 of `dtype`; all NaN where the bool `nan` is True."""
    if nan is None:
        return _unpack(packed, shape, dtype, 1, -1, bitpack.unpack_signs)
    not_a_number = tf.constant(float("nan"), dtype)
    on = tf.where(nan, not_a_number, tf.constant(1, dtype))
    off = tf.where(nan, not_a_number, tf.constant(-1, dtype))
    return _unpack(packed, shape, dtype, on, off,
                   lambda packed, shape, dtype: bitpack.unpack_signs(packed, shape, dtype, nan=nan))


def sign_and_pack(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(+1 where x >= 0 else -1, the packed bits of x >= 0) in one pass over x.

    The signs may take x's buffer when nothing else reads x any more.
    """
    x = tf.convert_to_tensor(x)
    if use(x):
        return tuple(library().lqp_sign_and_pack(x, S=x.dtype)[:2])
    positive = x >= 0
    packed = bitpack.pack_bits(positive)
    return tf.where(positive, tf.constant(1, x.dtype), tf.constant(-1, x.dtype)), packed


def sign_pack_and_nan_rows(x: tf.Tensor, after=(), mask_bound=None, nan: str = "rows",
                           signs_dtype=None) -> tuple[tf.Tensor, ...]:
    """(signs, packed bits of x >= 0, `bitpack.nan_rows(x)`), the signs NaN in a sample holding a NaN.

    A NaN has no sign bit: the flags ([batch, 1, ...] bool) carry it to
    `bitpack.unpack_signs(..., nan=...)`. The signs are computed after the ops
    `after` (e.g. what a backward pass keeps of x), so that x can be freed
    before they are allocated (the kernel may write them in x's buffer).
    One pass over x by the kernel; its pure-TF reference reads x twice
    (a comparison and `is_nan`) and builds the signs from the bool result.
    With `mask_bound` (a scalar c in x's dtype), also the packed mask of
    `-c <= x <= c` (a clipped STE's B'), in the same pass: then
    (signs, packed, nan_rows, packed_mask). `nan="elements"`: NaN signs at
    the NaN elements only (`larq.math.sign`'s), for a kernel's signs.
    `signs_dtype`: the signs' type (default x's); float32 for a 16-bit x is
    written by the kernel directly (a 16-bit kernel read in float32, no cast).

    ```python
    signs, packed, nan_rows = kernels.sign_pack_and_nan_rows(x)
    signs, packed, nan_rows, mask = kernels.sign_pack_and_nan_rows(x, mask_bound=1.0)
    ```
    """
    if nan not in ("rows", "elements"):
        raise ValueError(f"`nan` must be 'rows' or 'elements', got {nan!r}.")
    x = tf.convert_to_tensor(x)
    signs_dtype = tf.as_dtype(signs_dtype or x.dtype)
    masked = mask_bound is not None
    if masked:
        mask_bound = tf.cast(mask_bound, x.dtype)
    if x.shape.rank and use(x) and (signs_dtype == x.dtype or (
            x.dtype in _HALF and signs_dtype == tf.float32)):
        attrs = dict(nan_signs=nan == "rows", nan_elements=nan == "elements", S=signs_dtype)
        with tf.control_dependencies(list(after)):
            if masked:
                signs, packed, mask, nan_rows = library().lqp_sign_mask_and_pack(
                    x, mask_bound, **attrs)
                return signs, packed, nan_rows, mask
            return tuple(library().lqp_sign_and_pack(x, **attrs))
    positive = x >= 0
    packed = bitpack.pack_bits(positive)
    nan_rows = bitpack.nan_rows(x)
    mask = []
    if masked:
        mask = [bitpack.pack_bits(prox.clip_mask(x, mask_bound))]
    # Only comparisons read x, and the signs come from their bool result once
    # the bits are packed: x is freed before the signs are allocated.
    with tf.control_dependencies([packed, nan_rows, *mask, *after]):
        not_a_number = tf.constant(float("nan"), signs_dtype)
        where_nan = nan_rows if nan == "rows" else tf.math.is_nan(x)
        one = tf.where(where_nan, not_a_number, tf.constant(1, signs_dtype))
        minus_one = tf.where(where_nan, not_a_number, tf.constant(-1, signs_dtype))
        signs = tf.where(positive, one, minus_one)
    return (signs, packed, nan_rows, *mask)


def pack_signs_and_nan(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(`pack_signs(x)`, whether x holds a NaN): one pass over x (a kernel kept as bits).

    ```python
    packed, nan = kernels.pack_signs_and_nan(kernel)
    kernels.unpack_signs(packed, tf.shape(kernel), nan=nan)   # all NaN if a weight was
    ```
    """
    x = tf.convert_to_tensor(x)
    if x.shape.rank and use(x):
        _, packed, nan_rows = library().lqp_sign_and_pack(x, S=x.dtype)
        return packed, tf.reduce_any(nan_rows)
    return bitpack.pack_signs(x), tf.reduce_any(tf.math.is_nan(x))


def apply_mask(dx: tf.Tensor, packed: tf.Tensor, inside, outside, select: bool,
               dtype=None) -> tf.Tensor:
    """`dx * where(bits, inside, outside)`; `select=True`: `where(bits, dx, 0)` (inside 1, outside 0).

    Computed in dx's type; `dtype` (default dx's): the result's type, rounded
    once (a float32 gradient of a 16-bit kernel: the kernel writes it directly).
    """
    dx = tf.convert_to_tensor(dx)
    dtype = tf.as_dtype(dtype or dx.dtype)
    inside, outside = (tf.cast(v, dx.dtype) for v in (inside, outside))
    if use(dx) and (dtype == dx.dtype or (dx.dtype == tf.float32 and dtype in _HALF)):
        return library().lqp_apply_mask(dx, packed, inside, outside, select=bool(select), R=dtype)
    mask = bitpack.unpack_bits(packed, tf.shape(dx))
    if select:
        return tf.cast(tf.where(mask, dx, tf.constant(0, dx.dtype)), dtype)
    return tf.cast(dx * tf.where(mask, inside, outside), dtype)


# ---------------------------------------------------- BinaryBatchNorm(proposed)
def _channels_last(y: tf.Tensor, axes) -> bool:
    rank = y.shape.rank
    return rank is not None and list(axes) == list(range(rank - 1))


def bn_usable(y: tf.Tensor, axes) -> bool:
    """Whether the BinaryBatchNorm kernels run for `y` reduced over `axes` (channels last)."""
    return _channels_last(y, axes) and use(y, dtypes=_BN_DTYPES)


def l1_moments(y: tf.Tensor, epsilon: float) -> tuple[tf.Tensor, tf.Tensor]:
    r"""Per-channel \(\mu\), \(\psi = \operatorname{mean}|y - \mu| + \epsilon\) (channels last), shape [C].

    Kernel only: call where `bn_usable(y, axes)`; no gradient (the moments enter
    BinaryBatchNorm's custom backward as constants). A 16-bit y gives float32
    moments (float32 arithmetic).
    """
    return library().lqp_l1_moments(y, epsilon=float(epsilon), U=_statistics_dtype(y))


def _statistics_dtype(y: tf.Tensor) -> tf.DType:
    """float32 for a 16-bit y (the BatchNorm kernels' arithmetic), else y's dtype."""
    return tf.float32 if y.dtype in (tf.float16, tf.bfloat16) else y.dtype


def normalize_proposed(
    y: tf.Tensor,
    beta: tf.Tensor,
    mean: tf.Tensor,
    psi: tf.Tensor,
    gamma: tf.Tensor | None = None,
    edges=(),
) -> tf.Tensor:
    r"""BinaryBatchNorm(proposed)'s \(x = (y - \mu)/\psi + \beta\) with its custom gradient, fused;
    with `gamma` (scale=True) \(x = \gamma (y - \mu)/\psi + \beta\).

    Kernel only (see `bn_usable`): the forward writes x (with a scale,
    \(\gamma \hat x + \beta\) and the signs and \(\omega\) of \(\hat x = (y - \mu)/\psi\)),
    \(\omega\) and the sign bits in one pass; the backward
    reads dx twice and the bits, and keeps between them only the bits, \(\psi\),
    \(\omega\) (and \(\gamma\)). `edges` (the `2^b - 1` bin edges of \(|x|/\omega\) of
    `magnitude_bits=b`): a second forward pass also keeps b bit planes of each
    element's bin and the bins' mean \(|x|\) per channel, which the backward uses
    in place of \(\omega\).

    A 16-bit y (a mixed-precision policy's): x and dy are 16-bit, the
    statistics, `beta`, `mean`, `psi`, `gamma` float32, the kernels' arithmetic
    float32 (each value rounded once; with `edges` and `gamma` the affine runs
    after the bins, as TF ops in y's type).
    """
    library_ = library()
    channels = y.shape[-1]
    stats = _statistics_dtype(y)
    scaled = gamma is not None
    edges = [float(e) for e in edges]
    flat = lambda v: tf.reshape(v, [channels])  # noqa: E731

    @tf.custom_gradient
    def normalize(y, gamma, beta, mean, psi):
        flat_psi = flat(psi)
        flat_gamma = flat(gamma) if scaled else None
        # The affine in the kernel, unless the bins need the normalized value first.
        fused_affine = scaled and not edges
        shift = tf.zeros([channels], stats) if scaled and edges else flat(beta)
        x, omega, bits = library_.lqp_binary_batch_norm_forward(
            y, shift, flat(mean), flat_psi, flat_gamma if fused_affine else tf.zeros([0], stats))
        if edges:
            planes, levels = library_.lqp_magnitude_bins(x, omega, edges=edges)
            with tf.control_dependencies([planes]):  # before the affine may overwrite x
                x = tf.identity(x)
        if scaled and not fused_affine:
            x = x * tf.cast(flat_gamma, x.dtype) + tf.cast(flat(beta), x.dtype)

        def grad(dx):
            # Gated on dx (a single op, so nothing runs early in graph mode anyway).
            # Without a scale gamma = 1, and without bins no planes (bin 0 for
            # all, its level omega), made here: nothing more is kept.
            if edges:
                kept_planes, kept_levels = planes, levels
            else:
                kept_planes = tf.zeros([0, tf.size(bits)], tf.uint8)
                kept_levels = tf.reshape(omega, [1, channels])
            dy, dbeta, dgamma = library_.lqp_binary_batch_norm_grad(
                dx, bits, flat_psi, kept_levels,
                flat_gamma if scaled else tf.ones_like(flat_psi), kept_planes)
            dgamma = tf.reshape(dgamma, tf.shape(gamma)) if scaled else None
            return dy, dgamma, tf.reshape(dbeta, tf.shape(beta)), None, None

        return x, grad

    return normalize(y, gamma if scaled else tf.ones([channels], stats), beta, mean, psi)


# ------------------------------------------------------------ optimizer updates
def _f32(value) -> tf.Tensor:
    return tf.cast(value, tf.float32)


def _clip(clip) -> tf.Tensor:
    return tf.constant(float("inf") if clip is None else float(clip), tf.float32)


def fused_apply_adam(var, m, v, grad, *, lr, beta_1, beta_2, epsilon, beta_1_power,
                     beta_2_power, grad_scale=1.0, sign_gradient: bool = False,
                     clip: float | None = None, use_locking: bool = False) -> tf.Operation:
    r"""`ResourceApplyAdam` of a 16-bit or float32 `var` and its slots `m`, `v`, in float32, one pass (kernel only).

    With \(g\) = `grad * grad_scale` (`sign(grad) * grad_scale` with `sign_gradient`)
    and \(\alpha = \text{lr} \sqrt{1 - \beta_2^t} / (1 - \beta_1^t)\):
    \(m \mathrel{+}= (g - m)(1 - \beta_1)\), \(v \mathrel{+}= (g^2 - v)(1 - \beta_2)\),
    \(\text{var} \mathrel{-}= \alpha m / (\sqrt v + \epsilon)\), then
    `clip_by_value(var, -clip, clip)` (a weight_clip constraint; None: none),
    each stored rounded once. The scalars are cast to float32. Call where
    `use(var, grad, dtypes=UPDATE_DTYPES)`.
    """
    return library().lqp_fused_apply_adam(
        var.handle, m.handle, v.handle, _f32(beta_1_power), _f32(beta_2_power), _f32(lr),
        _f32(beta_1), _f32(beta_2), _f32(epsilon), grad, _f32(grad_scale), _clip(clip),
        sign_gradient=bool(sign_gradient), use_locking=bool(use_locking))


def fused_apply_momentum(var, accum, grad, *, lr, momentum, nesterov: bool = False,
                         grad_scale=1.0, sign_gradient: bool = False,
                         clip: float | None = None, use_locking: bool = False) -> tf.Operation:
    r"""`ResourceApplyKerasMomentum` of a 16-bit or float32 `var` and `accum`, in float32, one pass (kernel only).

    \(a = a \mu - g\,\text{lr}\); \(\text{var} \mathrel{+}= a\), or with `nesterov`
    \(\text{var} \mathrel{+}= a \mu - g\,\text{lr}\); \(g\) and `clip` as in `fused_apply_adam`.
    """
    return library().lqp_fused_apply_momentum(
        var.handle, accum.handle, _f32(lr), grad, _f32(momentum), _f32(grad_scale), _clip(clip),
        use_nesterov=bool(nesterov), sign_gradient=bool(sign_gradient),
        use_locking=bool(use_locking))


# ------------------------------------------------------------ max pool
def first_max_bits(x: tf.Tensor, outputs: tf.Tensor, pool_size) -> tf.Tensor:
    """Bits of MaxPoolGrad's choice in each window of a non-overlapping 'VALID' pool (kernel only)."""
    return library().lqp_first_max_bits(x, outputs, pool=list(pool_size))


def unpool_bits(dy: tf.Tensor, packed: tf.Tensor, input_shape, pool_size) -> tf.Tensor:
    """dx of that pool: dy at the set bits, 0 elsewhere (kernel only)."""
    shape = tf.cast(input_shape, tf.int32)
    return library().lqp_unpool_bits(dy, packed, shape, pool=list(pool_size))


def argmax_max_pool(x: tf.Tensor, pool_size, strides, padding: str) -> tuple[tf.Tensor, tf.Tensor]:
    """(`tf.nn.max_pool2d(x, ...)`, the packed argmax offsets) of an NHWC pool, one pass (kernel only).

    The offsets are `argmax_max_pool2d`'s: bit planes of ceil(log2(p q)) bits
    per output, the same bytes as its pure-TF reference packs.
    """
    return library().lqp_argmax_max_pool(
        x, ksize=list(pool_size), strides=list(strides), padding=padding.upper())


def argmax_unpool(dy: tf.Tensor, packed: tf.Tensor, input_shape, pool_size, strides,
                  padding: str) -> tf.Tensor:
    """dx of `argmax_max_pool`: TF's MaxPoolGrad from the packed offsets and dy (kernel only)."""
    return library().lqp_argmax_max_pool_grad(
        dy, packed, tf.cast(input_shape, tf.int32), ksize=list(pool_size), strides=list(strides),
        padding=padding.upper())
