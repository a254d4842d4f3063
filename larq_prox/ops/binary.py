r"""Binary conv / dense ops whose backward keeps only bits of the input.

`binary_conv2d(x, w)` computes `conv2d(sign(x), w)`; its gradient function
keeps, between the forward and the backward pass, the packed sign bits of x
and what the input quantizer's backward needs (an `InputBackward`, built from
the quantizer's declared `BackwardNeeds`):

| `BackwardNeeds.kind` | kept per input element | dx |
|---|---|---|
| `"none"` (BC, `SteSign(clip_value=None)`) | nothing more | \(g\) |
| `"mask"` (BNN, `ste_sign`, RPC, a user's 1-bit pair) | 1 mask bit | \(B'(\text{bit})\, g\) |
| `"derivative"` (`approx_sign`, `swish_sign`, BNN+, `ForwardBackward`) | \(B'(x)\) at `backward_bits` (8, 16 or None = exact float) | \(\widehat{B'}(x)\, g\) |

with \(g\) = `conv2d_backprop_input(w, dy)` and
\(dW\) = `conv2d_backprop_filter(sign(x), dy)`. A stored \(B'\) is quantized
uniformly over its per-call range \([lo, hi]\): with \(b\) bits,
\(|\widehat{B'} - B'| \le (hi - lo) / (2(2^b - 1))\) elementwise, so
\(|dx - dx_{exact}| \le (hi - lo) / (2(2^b - 1)) \cdot |g|\).

NaN: a NaN has no sign bit. A sample of x holding a NaN gets NaN signs (its
outputs are NaN, as with larq's `ste_sign`), and one per-call flag (one
reduction, no float copy) makes the backward's unpacked signs NaN, so dW is
NaN; a NaN binary kernel is restored as NaN, so dx is NaN. NaN may so spread
to more elements than in larq's computation, never fewer.

```python
from larq_prox import ops, quantizers

backward = ops.binary.InputBackward(quantizers.backward_needs("ste_sign"))
y = ops.binary.binary_conv2d(x, w, padding="SAME", input_backward=backward)
# = conv2d(ste_sign(x), w), gradients equal; the backward keeps 2 bits per x
```
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from larq_prox import kernels
from larq_prox.ops.kept import Kept
from larq_prox.ops.precision import arithmetic_dtype, chunked_compute, upcast
from larq_prox.quantizers import BackwardNeeds

__all__ = [
    "BACKWARD_BITS",
    "InputBackward",
    "KernelSign",
    "binary_conv2d",
    "binary_dense",
    "sign",
]

BACKWARD_BITS = (8, 16, None)
"""Valid bit widths of a stored B'(x): 8 or 16 bits (quantized), None (exact float)."""


def sign(x: tf.Tensor) -> tf.Tensor:
    """`larq.math.sign` (sign(0) = +1, NaN stays NaN) with one bool and one float temporary."""
    # A scalar branch: ones_like would fold into a constant of x's size.
    # tf.sign(x) is -1 where x < 0 and NaN where x is NaN (x >= 0 is False there).
    return tf.where(x >= 0, tf.constant(1, x.dtype), tf.sign(x))


def _unit(bits: int | None) -> tf.DType:
    return {8: tf.uint8, 16: tf.uint16}.get(bits)


class InputBackward:
    r"""B' of a binary layer's input quantizer, from what the forward kept of x.

    Built from the quantizer's `BackwardNeeds`; `keep(x)` runs in the forward
    pass, `apply(dx, kept, start, stop)` in the backward pass on the samples
    `start:stop` (for a chunked backward).

    ```python
    backward = InputBackward(lqp.quantizers.backward_needs("approx_sign"), backward_bits=8)
    backward.kept(per_sample=1024)   # [Kept("input B' (8 bits)", 1024, 8)]
    ```

    # Arguments
        needs: the quantizer's declaration (`lqp.quantizers.backward_needs`).
        backward_bits: bits of a stored B'(x) (kind "derivative" only): 8, 16,
            or None for the exact float B'.
    """

    def __init__(self, needs: BackwardNeeds, backward_bits: int | None = 8):
        if backward_bits not in BACKWARD_BITS:
            raise ValueError(
                f"`backward_bits` must be one of {BACKWARD_BITS} (bits of the stored B'(x); "
                f"None keeps it exact in float), got {backward_bits!r}."
            )
        self.needs = needs
        self.backward_bits = backward_bits

    @property
    def bits(self) -> int:
        """Bits kept per input element beyond its sign (32 for an exact float B')."""
        if self.needs.kind == "derivative":
            return 32 if self.backward_bits is None else self.backward_bits
        return self.needs.bits_per_element

    @property
    def exact(self) -> bool:
        """Whether dx is exact (no quantized B')."""
        return self.needs.kind != "derivative" or self.backward_bits is None

    def kept(self, per_sample: int) -> list[Kept]:
        """What `keep` keeps, for an input of `per_sample` elements per sample."""
        kind = self.needs.kind
        if kind == "none":
            return []
        if kind == "mask":
            return [Kept("input mask", per_sample, 1)]
        return [Kept(f"input B' ({self.bits} bits)", per_sample, self.bits)]

    def keep(self, x: tf.Tensor) -> dict:
        """The forward's part: what the backward needs of x (x itself is not kept)."""
        x = tf.stop_gradient(x)
        kind = self.needs.kind
        if kind == "none":
            return {}
        if kind == "mask":
            inside, outside = (
                tf.cast(self.needs.from_mask(tf.constant(bit), x.dtype), x.dtype)
                for bit in (True, False)
            )
            if self.needs.mask_bound is not None:
                # -c <= x <= c: packed with the signs, in the op's one pass over x
                # (`sign_and_pack`); c is read here, where B' may read variables.
                bound = tf.stop_gradient(tf.cast(self.needs.mask_bound(x.dtype), x.dtype))
                return dict(bound=bound, inside=inside, outside=outside)
            return dict(bits=kernels.pack_bits(self.needs.mask(x)), inside=inside, outside=outside)
        # B' in float32 for 16-bit activations: its 8-bit codes need more than
        # bfloat16's 8 bits of precision to round right.
        x = upcast(x)
        derivative = tf.reshape(tf.cast(self.needs.derivative(x), x.dtype), [-1])
        if self.backward_bits is None:
            return dict(values=derivative)
        lo, hi = tf.reduce_min(derivative), tf.reduce_max(derivative)
        step = (hi - lo) / (2**self.backward_bits - 1)
        safe = tf.where(step > 0, step, tf.constant(1, x.dtype))
        codes = tf.cast(tf.round((derivative - lo) / safe), _unit(self.backward_bits))
        # An empty batch has no range: lo, step are then +-inf and unused.
        return dict(codes=codes, lo=lo, step=step)

    def tensors(self, kept: dict) -> list[tf.Tensor]:
        """The kept tensors of activation size (for ordering: x dies once they exist)."""
        return [kept[k] for k in ("bits", "values", "codes") if k in kept]

    def sign_and_pack(self, x: tf.Tensor, kept: dict) -> tuple[tuple, dict]:
        """`kernels.sign_pack_and_nan_rows(x)` after what `kept` holds of x, and `kept` completed.

        A mask declared as `-c <= x <= c` (`keep` left its bound) is packed by
        the same pass over x as the signs; any other `kept` passes through.
        """
        if "bound" not in kept:
            return kernels.sign_pack_and_nan_rows(x, after=self.tensors(kept)), kept
        *results, bits = kernels.sign_pack_and_nan_rows(x, mask_bound=kept["bound"])
        return tuple(results), {**kept, "bits": bits}

    def apply(self, dx: tf.Tensor, kept: dict, start=None, stop=None, per_sample=None):
        """dx * B'(x) for the samples start:stop (all when None) of `per_sample` elements each.

        Gated on dx: what was kept is unpacked only once dx exists.
        """
        kind = self.needs.kind
        if kind == "none":
            return dx
        def rows(flat, per_row):
            if start is None:
                return flat
            return flat[start * per_row : stop * per_row]


        with tf.control_dependencies([dx]):
            if kind == "mask":
                packed = rows(kept["bits"], None if start is None else per_sample // 8)
                inside, outside = kept["inside"], kept["outside"]
                select = _is_constant(inside, 1) and _is_constant(outside, 0)
                return kernels.apply_mask(dx, packed, inside, outside, select)
            if "values" in kept:
                derivative = tf.cast(rows(kept["values"], per_sample), dx.dtype)
            else:
                codes = rows(kept["codes"], per_sample)
                lo, step = (tf.cast(kept[k], dx.dtype) for k in ("lo", "step"))
                derivative = lo + tf.cast(codes, dx.dtype) * step
        return dx * tf.reshape(derivative, tf.shape(dx))


def _is_constant(tensor: tf.Tensor, value) -> bool:
    static = tf.get_static_value(tensor)
    return static is not None and np.all(static == value)


class KernelSign:
    r"""sign(w) with gradient \(B'(w)\,dy\) for a kernel quantizer whose B' needs <= 1 bit.

    The values of larq's `ste_sign` / PC++ BNN, BC, RPC on a kernel, without
    their `zeros_like` / `ones_like`, which TF's graph optimizer folds into
    kernel-sized constants that stay resident (about one float copy of every
    binary kernel). B' comes from the quantizer's `BackwardNeeds` ("none" or
    "mask"); its two values are read when the kernel is quantized. A "mask"
    backward keeps the mask as bits (`kept`), not the latent kernel: that is a
    float copy whenever the kernel is read in another type than the
    variable's (a 16-bit policy, `storage_dtype`), alive from the forward use
    to the backward.

    `scaled=True`: \(s\,\operatorname{sign}(w)\) with \(s\) = stop_gradient(mean
    |w| over every axis but the last), gradient \(s\,B'(w)\,dy\): larq's
    `MagnitudeAwareSign` (`lqp.quantizers.scaled_sign_backward`). The
    backward keeps the mask bits and the per-channel scales.

    ```python
    quantize = KernelSign(lqp.quantizers.backward_needs("ste_sign"))
    binary_kernel = quantize(kernel)
    ```
    """

    precision = 1

    def __init__(self, needs: BackwardNeeds, scaled: bool = False):
        if needs.kind not in ("none", "mask"):
            raise ValueError(f"KernelSign needs a 'none' or 'mask' backward, got {needs.kind!r}.")
        self.needs = needs
        self.scaled = scaled

    def kept(self, kernel_shape) -> list[Kept]:
        """What the backward keeps: the mask bits of a "mask" backward, and the scales if scaled."""
        kept = [] if self.needs.kind == "none" else [
            Kept("kernel mask", int(np.prod(kernel_shape)), 1, per_sample=False)]
        if self.scaled:
            kept.append(kernel_scales_kept(kernel_shape))
        return kept

    def __call__(self, kernel: tf.Tensor, dtype=None) -> tf.Tensor:
        """The quantized kernel, in `dtype` (default: the kernel's)."""
        dtype = tf.as_dtype(dtype or kernel.dtype)
        # Values of B' read outside the op: it then captures scalars, not variables.
        values, bound = {}, None
        if self.needs.kind == "mask":
            values = {
                key: tf.cast(self.needs.from_mask(tf.constant(bit), kernel.dtype), kernel.dtype)
                for key, bit in (("inside", True), ("outside", False))
            }
            if self.needs.mask_bound is not None:
                bound = tf.cast(self.needs.mask_bound(kernel.dtype), kernel.dtype)

        @tf.custom_gradient
        def _op(kernel):
            scale = None
            if self.scaled:
                axes = list(range(kernel.shape.rank - 1))
                scale = tf.reduce_mean(tf.abs(tf.cast(kernel, dtype)), axes)

            def scaled(signs):
                return signs if scale is None else tf.cast(signs, dtype) * scale

            def scale_gradient(dy):  # in `dtype`, dy's
                return dy if scale is None else tf.cast(dy, dtype) * scale

            def signs_of(signs):  # the signs in `dtype` (a 16-bit kernel's, read in float32)
                return tf.cast(sign(kernel) if signs is None else signs, dtype)

            # With the kernels, one pass over the kernel: its signs in `dtype`
            # (NaN at a NaN weight, as larq's sign) and a clipped STE's mask
            # (-c <= w <= c); the gradient is rounded to the kernel's type once.
            fused = kernels.use(kernel)
            if self.needs.kind == "none":
                signs = (kernels.sign_pack_and_nan_rows(kernel, nan="elements", signs_dtype=dtype)[0]
                         if fused else None)
                return scaled(signs_of(signs)), lambda dy: tf.cast(scale_gradient(dy), kernel.dtype)
            if bound is not None and fused:
                signs, _, _, packed_mask = kernels.sign_pack_and_nan_rows(
                    kernel, mask_bound=bound, nan="elements", signs_dtype=dtype)
            else:
                signs, packed_mask = None, kernels.pack_bits(self.needs.mask(kernel))
            select = _is_constant(values["inside"], 1) and _is_constant(values["outside"], 0)

            def grad(dy):
                dy = scale_gradient(dy)  # B' from the bits, in one pass over dy
                return kernels.apply_mask(dy, packed_mask, values["inside"], values["outside"],
                                          select, dtype=kernel.dtype)

            with tf.control_dependencies([packed_mask]):  # the latent kernel read once, here
                return scaled(signs_of(signs)), grad

        return _op(kernel)


def _binarize_and_pack(x: tf.Tensor, backward: InputBackward, kept: dict):
    """(sign(x), its packed bits, `bitpack.nan_rows(x)`), after `kept` (what `backward` keeps of x),
    and `kept` completed (a clipped STE's mask is packed in the same pass).

    A NaN has no sign bit (NaN >= 0 is False): a sample holding one gets NaN
    signs (so NaN outputs, as larq's `ste_sign` gives NaN there), and the
    per-call flag makes the backward's unpacked signs NaN (so a NaN kernel
    gradient, as larq's). `kernels.sign_pack_and_nan_rows`: one pass over x
    (fused kernel) or comparisons and one reduction (pure TF), no float copy
    of x; the signs come after `kept`, so x is freed before sign(x) and the
    conv's output are allocated (two float activations alive here, not three).
    """
    return backward.sign_and_pack(x, kept)


def _kept_kernel(kernel: tf.Tensor, binary_kernel: bool, dtype: tf.DType, scaled: bool = False):
    """A function of the gate (dy) giving back the kernel, in `dtype`, in the backward pass.

    A +-1 kernel is kept as sign bits: all binary kernels of a BinaryNet
    together are as large as its largest activation, and closing over them
    would keep every one alive from its forward use to its backward use. A
    +-s kernel (`scaled`: one s per output channel, the last axis) is kept as
    sign bits and s = max |kernel| per channel: s * (+-1) gives it back
    exactly. `restore(gate, start, stop)` gives rows [start, stop) of the
    kernel (a dense kernel restored in blocks; `start * columns` a multiple of 8).
    """
    if not binary_kernel:

        def gated(gate, start=None, stop=None):
            with tf.control_dependencies([gate]):
                return tf.cast(tf.identity(kernel[start:stop]), dtype)

        return gated
    # A NaN latent weight gives a NaN binary weight, which has no sign bit:
    # the flag restores the kernel as NaN, so that dx is NaN as larq's is.
    packed, nan = kernels.pack_signs_and_nan(kernel)
    shape = kernel.shape.as_list()
    scales = None
    if scaled:
        scales = tf.reduce_max(tf.abs(tf.cast(kernel, dtype)), list(range(len(shape) - 1)))

    def restore(gate, start=None, stop=None):
        if start is None:
            bits, rows = packed, shape
        else:
            row_bits = int(np.prod(shape[1:]))
            bits = packed[start * row_bits // 8 : (stop * row_bits + 7) // 8]
            rows = [stop - start, *shape[1:]]
        with tf.control_dependencies([gate]):
            signs = kernels.unpack_signs(bits, rows, dtype, nan=nan)
        return signs if scales is None else signs * scales

    return restore


_BLOCK_BYTES = 8 * 2**20
"""The float32 bytes of one block of a large binary dense kernel's rows (`binary_dense`)."""


def _kernel_row_bounds(kernel_shape, binary_kernel: bool) -> list[int]:
    """Row bounds [0, ..., rows] of the blocks a binary dense kernel is read in.

    Blocks of at most `_BLOCK_BYTES` in float32, each starting on a byte of
    the kernel's packed bits. One block where the kernel is not +-1 (its
    partial products would change the rounding) or its shape is not static.
    """
    kernel_shape = tf.TensorShape(kernel_shape)
    if not binary_kernel or kernel_shape.rank != 2 or not kernel_shape.is_fully_defined():
        return [0, None]
    rows, columns = kernel_shape.as_list()
    step = 8 // np.gcd(columns, 8)  # rows per whole byte of bits
    blocks = -(-rows * columns * 4 // _BLOCK_BYTES)
    size = max(step, -(-rows // blocks // step) * step)
    return [*range(0, rows, size), rows]


def kernel_kept(kernel_shape, binary_kernel: bool, bits: int = 32,
                scaled: bool = False) -> list[Kept]:
    """What the binary ops keep of the kernel: its sign bits (and scales), or the kernel itself."""
    count = int(np.prod(kernel_shape))
    if binary_kernel:
        signs = Kept("kernel signs", count, 1, per_sample=False)
        return [signs, kernel_scales_kept(kernel_shape, bits)] if scaled else [signs]
    return [Kept(f"kernel ({bits} bits)", count, bits, per_sample=False)]


def kernel_scales_kept(kernel_shape, bits: int = 32) -> Kept:
    """One scale per output channel (the kernel's last axis) of a +-s kernel."""
    return Kept("kernel scales", int(kernel_shape[-1]), bits, per_sample=False)


def _passthrough() -> InputBackward:
    return InputBackward(BackwardNeeds("none"))


HALF_PRECISION_CHUNKS = 4
"""Batch chunks of a binary conv's backward (and forward) for 16-bit activations."""


def default_chunks(dtype) -> int:
    """Batch chunks of `binary_conv2d(chunks=None)` for an input of `dtype`.

    1 for float32 x: the backward's largest buffers are dy and dx, each a
    whole activation, and the float32 signs unpacked for the kernel gradient
    are no larger than dx, so chunks lower no peak (measured: CNV, BinaryNet
    and ResNetE-18 peaks within 5 % of 4 chunks) and cost 5-10 % of the step.
    `HALF_PRECISION_CHUNKS` for 16-bit x: dy and dx are 16-bit, and the
    float32 signs and results the convolutions compute on would be twice
    their size in one piece (CNV bfloat16 peak: 76 MiB unchunked, 63 MiB in 4).

    ```python
    default_chunks(tf.bfloat16)  # 4
    ```
    """
    return HALF_PRECISION_CHUNKS if arithmetic_dtype(dtype) != tf.as_dtype(dtype) else 1


def binary_conv2d(
    x: tf.Tensor,
    kernel: tf.Tensor,
    strides=(1, 1),
    padding: str = "VALID",
    dilations=(1, 1),
    input_backward: InputBackward | None = None,
    pad_values: float = 0.0,
    binary_kernel: bool = False,
    chunks: int | None = 1,
    kernel_scaled: bool = False,
) -> tf.Tensor:
    r"""`conv2d(sign(x), kernel)` (NHWC) whose gradient keeps only the bits of x.

    dkernel = `conv2d_backprop_filter(sign(x), dy)`; dx = \(B'(x)\) *
    `conv2d_backprop_input(kernel, dy)` with B' from `input_backward` (B' = 1
    when None). `pad_values` is the value of the padded border of sign(x) for
    `padding="SAME"` (larq's `pad_values`). `binary_kernel=True` promises a
    +-1 kernel, which the backward then keeps as bits too; with
    `kernel_scaled=True` a +-s kernel (one s per output channel, larq's
    `MagnitudeAwareSign`), kept as bits and the scales. `chunks > 1` runs
    the backward in that many batch chunks (less memory for 16-bit x; the
    gradients then equal the one-chunk ones up to float rounding);
    `chunks=None` picks `default_chunks(x.dtype)`.

    ```python
    y = binary_conv2d(x, w, padding="SAME", input_backward=InputBackward(needs))
    ```
    """
    backward = input_backward or _passthrough()
    padding = padding.upper()
    strides = [1, *strides, 1]
    dilations = [1, *dilations, 1]
    explicit = None
    if padding == "SAME" and not (not tf.is_tensor(pad_values) and pad_values == 0.0):
        explicit = _same_padding(x, kernel, strides, dilations)
        padding = "VALID"

    def _padded(signs):
        if explicit is None:
            return signs
        return tf.pad(signs, explicit, constant_values=tf.cast(pad_values, signs.dtype))

    # Outside the op: B' may read the quantizer's variables (RPC's varrho).
    kept = backward.keep(x)

    @tf.custom_gradient
    def _op(x, kernel):
        shape = tf.shape(x)
        compute = arithmetic_dtype(x.dtype)  # float32 for 16-bit activations
        (signs, packed_signs, nan_rows), kept_x = _binarize_and_pack(x, backward, kept)
        nan = tf.reduce_any(nan_rows)
        kernel_shape = tf.shape(kernel)
        kept_kernel = _kept_kernel(kernel, binary_kernel, compute, kernel_scaled)

        per_sample = x.shape[1:].num_elements()
        k = default_chunks(x.dtype) if chunks is None else chunks
        k = k if per_sample is not None and per_sample % 8 == 0 else 1
        bytes_per_sample = (per_sample or 0) // 8
        bounds = [shape[0] * i // k for i in range(k + 1)]

        def part(tensor, i, per_row=1):
            if k == 1:
                return tensor
            return tensor[bounds[i] * per_row : bounds[i + 1] * per_row]

        kernel_compute = tf.cast(kernel, compute)  # once, not per chunk

        def conv(signs_part):
            return tf.nn.conv2d(_padded(tf.cast(signs_part, compute)), kernel_compute,
                                strides, padding, dilations=dilations)

        if compute == x.dtype:
            outputs = conv(signs)
        elif k == 1:
            outputs = tf.cast(conv(signs), x.dtype)
        else:
            # 16-bit x: each chunk's float32 signs unpacked from the bits, so
            # that neither x nor its 16-bit signs stay alive in the forward.
            nan_factor = tf.where(nan_rows, tf.constant(float("nan"), compute),
                                  tf.constant(1, compute))

            def conv_chunk(i):
                rows = tf.concat([[bounds[i + 1] - bounds[i]], shape[1:]], 0)
                signs = kernels.unpack_signs(part(packed_signs, i, bytes_per_sample), rows, compute)
                return conv(signs * part(nan_factor, i))  # NaN signs in a sample holding a NaN

            outputs = chunked_compute(conv_chunk, bounds, x.dtype)
        border = tf.constant([0, 0, 0, 0])
        if explicit is not None:
            rows_added, cols_added = (sum(explicit[axis]) for axis in (1, 2))
            border = tf.stack([0, rows_added, cols_added, 0])

        def dilated_grad(dy):
            # TF's CPU Conv2DBackpropFilter/Input refuse dilations > 1 (without
            # oneDNN): differentiate tf.nn.convolution (space_to_batch) instead.
            with tf.control_dependencies([dy]):
                signs = kernels.unpack_signs(packed_signs, shape, compute, nan=nan)
            restored = kept_kernel(signs)
            with tf.GradientTape() as tape:
                tape.watch([signs, restored])
                y = tf.nn.convolution(
                    _padded(signs), restored, strides[1:3], padding, dilations=dilations[1:3]
                )
            dx, dkernel = tape.gradient(y, [signs, restored], output_gradients=upcast(dy))
            return tf.cast(backward.apply(dx, kept_x), x.dtype), tf.cast(dkernel, kernel.dtype)

        def grad(dy):
            if any(d > 1 for d in dilations):
                return dilated_grad(dy)
            # Every backward op waits for the previous one (starting from dy):
            # graph mode would otherwise unpack during the forward pass, or run
            # the chunks side by side. Chunks over the batch bound the
            # unpacked signs and the conv kernels' scratch to 1/k of an
            # activation; dkernel then sums k partial products. dx waits for
            # dkernel even in one chunk: side by side the two products gained
            # <= 2 % of a step once bounded to one layer, and shifted the peak
            # (benchmarks/results/backward_schedule_s13.json).
            gate, dkernel = dy, None
            for i in range(k):
                rows = tf.concat([[bounds[i + 1] - bounds[i]], shape[1:]], 0)
                with tf.control_dependencies([gate]):
                    bits = part(packed_signs, i, bytes_per_sample)
                    signs = _padded(kernels.unpack_signs(bits, rows, compute, nan=nan))
                    dy_part = upcast(part(dy, i))  # 16-bit dy: its float32 chunk, in turn
                partial = tf.compat.v1.nn.conv2d_backprop_filter(
                    signs, kernel_shape, dy_part, strides, padding, dilations=dilations
                )
                dkernel = partial if dkernel is None else dkernel + partial
                gate = dkernel
            restored = kept_kernel(dkernel)
            # The chunks are written into one buffer in place: a concat would
            # hold all chunks and the whole result at once. XLA has no
            # InplaceUpdate, and places a concat's parts in its output anyway.
            in_place = k > 1 and not kernels.in_xla_context()
            dxs = []
            if in_place:
                with tf.control_dependencies([gate]):
                    dx_all = tf.raw_ops.Empty(shape=shape, dtype=x.dtype, init=False)
                gate = dx_all
            for i in range(k):
                rows = tf.concat([[bounds[i + 1] - bounds[i]], shape[1:]], 0)
                with tf.control_dependencies([gate]):
                    dy_part = upcast(part(dy, i))
                with tf.control_dependencies([dy_part]):
                    dx = tf.compat.v1.nn.conv2d_backprop_input(
                        rows + border, restored, dy_part, strides, padding, dilations=dilations
                    )
                if explicit is not None:
                    dx = tf.slice(dx, [p[0] for p in explicit], rows)
                if k == 1:
                    dx = backward.apply(dx, kept_x)
                else:
                    dx = backward.apply(dx, kept_x, bounds[i], bounds[i + 1], per_sample)
                dx = tf.cast(dx, x.dtype)  # the chunk's float32 result, rounded once
                if in_place:
                    rows_i = tf.range(bounds[i], bounds[i + 1])
                    dx_all = gate = tf.raw_ops.InplaceUpdate(x=dx_all, i=rows_i, v=dx)
                else:
                    dxs.append(dx)
                    gate = dx
            dkernel = tf.cast(dkernel, kernel.dtype)
            if in_place:
                return dx_all, dkernel
            return (dxs[0] if k == 1 else tf.concat(dxs, 0)), dkernel

        return outputs, grad

    return _op(x, kernel)


def _same_padding(x, kernel, strides, dilations):
    """[[0, 0], [top, bottom], [left, right], [0, 0]] of TF's 'SAME' padding."""
    pads = [[0, 0]]
    for axis in (1, 2):
        size = x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]
        k = (kernel.shape[axis - 1] - 1) * dilations[axis] + 1
        stride = strides[axis]
        out = (size + stride - 1) // stride
        total = (out - 1) * stride + k - size
        total = tf.maximum(total, 0) if tf.is_tensor(total) else max(total, 0)
        pads.append([total // 2, total - total // 2])
    pads.append([0, 0])
    return pads


def binary_dense(
    x: tf.Tensor,
    kernel: tf.Tensor,
    input_backward: InputBackward | None = None,
    binary_kernel: bool = False,
    kernel_scaled: bool = False,
) -> tf.Tensor:
    r"""`sign(x) @ kernel` over the last axis of x (rank >= 2) whose gradient keeps only bits of x.

    Rank > 2 (a transformer's tokens): the leading axes are flattened around the op.
    `binary_kernel`, `kernel_scaled`: as in `binary_conv2d`.

    ```python
    y = binary_dense(x, w, input_backward=InputBackward(needs))   # = ste_sign(x) @ w
    ```
    """
    if x.shape.rank is not None and x.shape.rank > 2:
        flat = tf.reshape(x, [-1, tf.shape(x)[-1]])
        outputs = binary_dense(flat, kernel, input_backward, binary_kernel, kernel_scaled)
        outputs = tf.reshape(outputs, tf.concat([tf.shape(x)[:-1], tf.shape(kernel)[-1:]], 0))
        outputs.set_shape(x.shape[:-1].concatenate(kernel.shape[-1:]))
        return outputs
    backward = input_backward or _passthrough()

    kept = backward.keep(x)  # outside the op, as in binary_conv2d

    @tf.custom_gradient
    def _op(x, kernel):
        shape = tf.shape(x)
        compute = arithmetic_dtype(x.dtype)  # float32 for 16-bit activations
        (signs, packed_signs, nan_rows), kept_x = _binarize_and_pack(x, backward, kept)
        nan = tf.reduce_any(nan_rows)
        signs = tf.cast(signs, compute)
        # Blocks only for a +-1 kernel: the partial sums of a +-s kernel would round.
        bounds = _kernel_row_bounds(kernel.shape, binary_kernel and not kernel_scaled)
        if kernel.dtype == compute or len(bounds) == 2:
            outputs = tf.matmul(signs, tf.cast(kernel, compute))
        else:
            # A 16-bit +-1 kernel read in float32 one block of rows at a time:
            # the partial products are integers, so their sum is exact.
            outputs = None
            for a, b in zip(bounds[:-1], bounds[1:]):
                with tf.control_dependencies([] if outputs is None else [outputs]):
                    part = tf.matmul(signs[:, a:b], tf.cast(kernel[a:b], compute))
                outputs = part if outputs is None else outputs + part
        outputs = tf.cast(outputs, x.dtype)
        kept_kernel = _kept_kernel(kernel, binary_kernel, compute, kernel_scaled)

        def grad(dy):
            dy = upcast(dy)
            if len(bounds) == 2:
                dx = tf.matmul(dy, kept_kernel(dy), transpose_b=True)
                with tf.control_dependencies([dx]):
                    signs = kernels.unpack_signs(packed_signs, shape, compute, nan=nan)
                dkernel = tf.cast(tf.matmul(signs, dy, transpose_a=True), kernel.dtype)
                return tf.cast(backward.apply(dx, kept_x), x.dtype), dkernel
            # Per block of kernel rows: dx's columns from the restored block,
            # then dkernel's rows, each block freed before the next starts.
            in_place = not kernels.in_xla_context()  # XLA has no InplaceUpdate
            with tf.control_dependencies([dy]):
                signs = kernels.unpack_signs(packed_signs, shape, compute, nan=nan)
            gate, dxs, dkernels, dkernel = signs, [], [], None
            for a, b in zip(bounds[:-1], bounds[1:]):
                dx = tf.matmul(dy, kept_kernel(gate, a, b), transpose_b=True)
                with tf.control_dependencies([dx]):
                    part = tf.cast(tf.matmul(signs[:, a:b], dy, transpose_a=True), kernel.dtype)
                if in_place:
                    if dkernel is None:
                        with tf.control_dependencies([part]):  # not allocated any earlier
                            dkernel = tf.raw_ops.Empty(shape=tf.shape(kernel), dtype=kernel.dtype)
                    gate = dkernel = tf.raw_ops.InplaceUpdate(x=dkernel, i=tf.range(a, b), v=part)
                else:
                    gate = part
                    dkernels.append(part)
                dxs.append(dx)
            dkernel = dkernel if in_place else tf.concat(dkernels, 0)
            return tf.cast(backward.apply(tf.concat(dxs, 1), kept_x), x.dtype), dkernel

        return outputs, grad

    return _op(x, kernel)
