// Fused CPU kernels of larq-prox's low-memory path (see larq_prox/kernels/__init__.py).
//
// Portable C++17: plain loops the compiler vectorizes (-O3, the machine's ISA),
// no intrinsics; 16-bit elements are converted by lqp_numeric.h's branch-free
// code, so that their loops vectorize too.
// Threads come from TensorFlow's CPU device pool. Bits are packed as
// larq_prox/bitpack.py packs them: element 8k+i of the flattened tensor is bit
// 7-i (most significant first) of byte k; padding bits of the last byte are 0.
// Reductions run over fixed blocks chosen from the shape alone and are summed
// in block order (in double), so results do not depend on the thread count.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_util.h"
#include "tensorflow/core/lib/core/threadpool.h"
#include "lqp_numeric.h"

namespace larq_prox {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;
using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

namespace {

// Runs fn(begin, end) over [0, total) on the device's worker threads.
template <typename Fn>
void parallel_for(OpKernelContext* ctx, int64_t total, int64_t cost_per_unit, Fn fn) {
  if (total <= 0) return;
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  pool->ParallelFor(total, cost_per_unit, [&fn](int64_t begin, int64_t end) { fn(begin, end); });
}

using numeric::narrow;
using numeric::widen;

// An element in its arithmetic type (float for 16-bit and float, double for double).
template <typename T>
inline numeric::Work<T> value(T v) { return widen<numeric::Work<T>>(v); }

// Eight 0/1 bytes as one byte of bits, the first byte in the highest bit (the
// bit order of pack_bits): each byte t lands on bit 63 - t of the product.
inline uint8_t pack_bytes(const uint8_t* bytes) {
  uint64_t v;
  std::memcpy(&v, bytes, 8);
  if constexpr (__BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__) v = __builtin_bswap64(v);
  return static_cast<uint8_t>((v * 0x8040201008040201ULL) >> 56);
}

// Rows per reduction block: a multiple of 8 (so that a block's bits start on a
// byte) of about 16K elements. Depends on the shape only.
int64_t block_rows(int64_t channels) {
  int64_t rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, channels));
  return std::max<int64_t>(8, (rows + 7) / 8 * 8);
}

inline uint8_t get_bit(const uint8_t* bits, int64_t e) { return (bits[e >> 3] >> (7 - (e & 7))) & 1; }

// m[j] = bit of element e0 + j (0 or 1) for j < len. Whole bytes at a time: a
// per-element `bit ? a : b` on random bits is a mispredicted branch each
// (10x slower); loops over m[] below compile to vector blends instead. The
// 64-bit spread of a byte takes half the time of 8 shifts (unpack 1.2 -> 0.6 ms
// on 3.2M floats).
inline void expand_bits(const uint8_t* bits, int64_t e0, int64_t len, uint8_t* m) {
  int64_t j = 0;
  for (; j < len && ((e0 + j) & 7); ++j) m[j] = get_bit(bits, e0 + j);
  // A whole byte at once: the byte copied to 8 lanes, lane t keeps bit 7 - t,
  // and + 0x7f moves that bit to the lane's top bit (no carry between lanes).
  for (const uint8_t* b = bits + ((e0 + j) >> 3); j + 8 <= len; j += 8, ++b) {
    uint64_t v = (*b * 0x0101010101010101ULL) & 0x0102040810204080ULL;
    v = ((v + 0x7f7f7f7f7f7f7f7fULL) & 0x8080808080808080ULL) >> 7;
    if constexpr (__BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__) v = __builtin_bswap64(v);
    std::memcpy(m + j, &v, 8);
  }
  for (; j < len; ++j) m[j] = get_bit(bits, e0 + j);
}

// Bytes [k0, k1) of the packed m (m[0] is element 8 * k0); n elements in all.
inline void pack_bytes(const uint8_t* m, int64_t k0, int64_t k1, int64_t n, uint8_t* bits) {
  for (int64_t k = k0; k < k1; ++k) {
    const uint8_t* v = m + 8 * (k - k0);
    uint8_t byte = 0;
    const int64_t count = std::min<int64_t>(8, n - 8 * k);
    if (count == 8) {
      byte = pack_bytes(v);
    } else {
      for (int64_t i = 0; i < count; ++i) byte |= static_cast<uint8_t>(v[i] << (7 - i));
    }
    bits[k] = byte;
  }
}

// m ? a : b (m is 0 or 1) by bit masks: no branch, so the loops vectorize
// (a branch on random bits mispredicts half the time), and exact for any value.
template <typename T>
inline T blend(uint8_t m, T a, T b) { return numeric::pick<T>(m != 0, a, b); }

template <>
inline bool blend<bool>(uint8_t m, bool a, bool b) { return m ? a : b; }

constexpr int64_t kChunkBytes = 512;  // elementwise kernels: 4096 elements per step

// Packs pred(i) for elements [8*byte_begin, min(8*byte_end, n)) into bits.
template <typename Pred>
inline void pack_range(uint8_t* bits, int64_t byte_begin, int64_t byte_end, int64_t n, Pred pred) {
  for (int64_t k = byte_begin; k < byte_end; ++k) {
    const int64_t base = 8 * k;
    uint8_t byte = 0;
    if (base + 8 <= n) {
      uint8_t v[8];
      for (int i = 0; i < 8; ++i) v[i] = static_cast<uint8_t>(pred(base + i));
      byte = pack_bytes(v);
    } else {
      for (int64_t i = 0; base + i < n; ++i) byte |= static_cast<uint8_t>(pred(base + i)) << (7 - i);
    }
    bits[k] = byte;
  }
}

Status channels_last(InferenceContext* c, ShapeHandle* y, DimensionHandle* channels) {
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, y));
  *channels = c->Dim(*y, -1);
  return tensorflow::OkStatus();
}

// The output's shape is the value of input 2 (a shape tensor): the unpool ops' dx.
Status shape_from_input_2(InferenceContext* c) {
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(2, &out));
  c->set_output(0, out);
  return tensorflow::OkStatus();
}

Status packed_shape(InferenceContext* c, ShapeHandle shape, ShapeHandle* out) {
  DimensionHandle n = c->NumElements(shape);
  if (!c->ValueKnown(n)) {
    *out = c->Vector(InferenceContext::kUnknownDim);
  } else {
    *out = c->Vector((c->Value(n) + 7) / 8);
  }
  return tensorflow::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------- l1 moments
REGISTER_OP("LqpL1Moments")
    .Input("y: T")
    .Output("mean: U")
    .Output("psi: U")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double} = DT_FLOAT")
    .Attr("epsilon: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle y;
      DimensionHandle channels;
      TF_RETURN_IF_ERROR(channels_last(c, &y, &channels));
      c->set_output(0, c->Vector(channels));
      c->set_output(1, c->Vector(channels));
      return tensorflow::OkStatus();
    })
    .Doc("Per-channel mean(y) and mean|y - mean| + epsilon over all axes but the last; "
         "arithmetic and statistics in U (float32 for 16-bit y).");

template <typename T, typename U>
class L1MomentsOp : public OpKernel {
 public:
  explicit L1MomentsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& y_t = ctx->input(0);
    OP_REQUIRES(ctx, y_t.dims() >= 1, InvalidArgument("LqpL1Moments: y needs rank >= 1"));
    const int64_t channels = y_t.dim_size(y_t.dims() - 1);
    const int64_t rows = channels ? y_t.NumElements() / channels : 0;
    Tensor *mean_t, *psi_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({channels}), &mean_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({channels}), &psi_t));
    const T* y = y_t.flat<T>().data();
    U* mean = mean_t->flat<U>().data();
    U* psi = psi_t->flat<U>().data();
    const int64_t per_block = block_rows(channels);
    const int64_t blocks = (rows + per_block - 1) / per_block;
    std::vector<double> partial(static_cast<size_t>(blocks * channels));
    // Sweep 1: mean. Sweep 2: mean |y - mean| (exact: needs the mean first).
    for (int sweep = 0; sweep < 2; ++sweep) {
      parallel_for(ctx, blocks, per_block * channels * 2, [&](int64_t b0, int64_t b1) {
        std::vector<U> acc(channels);
        for (int64_t b = b0; b < b1; ++b) {
          std::fill(acc.begin(), acc.end(), U(0));
          const int64_t r1 = std::min(rows, (b + 1) * per_block);
          for (int64_t r = b * per_block; r < r1; ++r) {
            const T* row = y + r * channels;
            if (sweep == 0) {
              for (int64_t c = 0; c < channels; ++c) acc[c] += widen<U>(row[c]);
            } else {
              for (int64_t c = 0; c < channels; ++c) {
                acc[c] += std::abs(widen<U>(row[c]) - mean[c]);
              }
            }
          }
          double* out = partial.data() + b * channels;
          for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<double>(acc[c]);
        }
      });
      for (int64_t c = 0; c < channels; ++c) {
        double total = 0.0;
        for (int64_t b = 0; b < blocks; ++b) total += partial[b * channels + c];
        const U average = static_cast<U>(total / static_cast<double>(rows));
        if (sweep == 0) {
          mean[c] = rows ? average : U(NAN);
        } else {
          psi[c] = (rows ? average : U(NAN)) + static_cast<U>(epsilon_);
        }
      }
    }
  }

 private:
  float epsilon_;
};

// ------------------------------------------------ BinaryBatchNorm(proposed)
REGISTER_OP("LqpBinaryBatchNormForward")
    .Input("y: T")
    .Input("beta: U")
    .Input("mean: U")
    .Input("psi: U")
    .Input("gamma: U")
    .Output("x: T")
    .Output("omega: U")
    .Output("bits: uint8")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double} = DT_FLOAT")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle y, bits;
      DimensionHandle channels;
      TF_RETURN_IF_ERROR(channels_last(c, &y, &channels));
      c->set_output(0, y);
      c->set_output(1, c->Vector(channels));
      TF_RETURN_IF_ERROR(packed_shape(c, y, &bits));
      c->set_output(2, bits);
      return tensorflow::OkStatus();
    })
    .Doc("x = (y - mean) / psi + beta, omega = mean|x| and the packed bits of x >= 0, one sweep; "
         "arithmetic in U, x rounded to T once (its bits are those of the rounded x). With a "
         "gamma of `channels` elements (scale=True; empty: none): z = (y - mean) / psi, omega = "
         "mean|z| and the bits of z >= 0, x = gamma z + beta, rounded to T once.");

template <typename T, typename U>
class BinaryBatchNormForwardOp : public OpKernel {
 public:
  explicit BinaryBatchNormForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& y_t = ctx->input(0);
    OP_REQUIRES(ctx, y_t.dims() >= 1, InvalidArgument("LqpBinaryBatchNormForward: y needs rank >= 1"));
    const int64_t channels = y_t.dim_size(y_t.dims() - 1);
    for (int i = 1; i < 4; ++i) {
      OP_REQUIRES(ctx, ctx->input(i).NumElements() == channels,
                  InvalidArgument("LqpBinaryBatchNormForward: beta, mean, psi need ", channels,
                                  " elements (the last axis of y)"));
    }
    const int64_t gammas = ctx->input(4).NumElements();
    OP_REQUIRES(ctx, gammas == 0 || gammas == channels,
                InvalidArgument("LqpBinaryBatchNormForward: gamma needs ", channels,
                                " elements (the last axis of y), or none without a scale; got ",
                                gammas));
    const int64_t n = y_t.NumElements();
    const int64_t rows = channels ? n / channels : 0;
    Tensor* x_t = nullptr;
    // x may take y's buffer: the normalization is y's last reader.
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, y_t.shape(), &x_t));
    Tensor *omega_t, *bits_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({channels}), &omega_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({(n + 7) / 8}), &bits_t));
    const T* y = y_t.flat<T>().data();
    const U* beta = ctx->input(1).flat<U>().data();
    const U* mean = ctx->input(2).flat<U>().data();
    const U* psi = ctx->input(3).flat<U>().data();
    const U* gamma = gammas ? ctx->input(4).flat<U>().data() : nullptr;
    T* x = x_t->flat<T>().data();
    U* omega = omega_t->flat<U>().data();
    uint8_t* bits = bits_t->flat<uint8_t>().data();
    const int64_t per_block = block_rows(channels);
    const int64_t blocks = (rows + per_block - 1) / per_block;
    std::vector<double> partial(static_cast<size_t>(blocks * channels));
    parallel_for(ctx, blocks, per_block * channels * 6, [&](int64_t b0, int64_t b1) {
      std::vector<U> acc(channels);
      // The block's z = (y - mean) / psi in cache (x holds gamma z + beta, or
      // z + beta unscaled); with a scale, the bits are packed from z.
      std::vector<U> z_block(static_cast<size_t>(per_block * channels));
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(acc.begin(), acc.end(), U(0));
        const int64_t r0 = b * per_block, r1 = std::min(rows, (b + 1) * per_block);
        for (int64_t r = r0; r < r1; ++r) {
          const T* in = y + r * channels;
          T* out = x + r * channels;
          if (gamma) {
            U* z = z_block.data() + (r - r0) * channels;
            for (int64_t c = 0; c < channels; ++c) {
              z[c] = (widen<U>(in[c]) - mean[c]) / psi[c];
              acc[c] += std::abs(z[c]);
            }
            for (int64_t c = 0; c < channels; ++c) out[c] = narrow<T>(z[c] * gamma[c] + beta[c]);
          } else {
            U* v = z_block.data() + (r - r0) * channels;
            for (int64_t c = 0; c < channels; ++c) {
              v[c] = (widen<U>(in[c]) - mean[c]) / psi[c] + beta[c];
              acc[c] += std::abs(v[c]);
            }
            for (int64_t c = 0; c < channels; ++c) out[c] = narrow<T>(v[c]);
          }
        }
        // This block's elements start on a byte (r0 is a multiple of 8); the
        // byte it shares with the next block is written by the next block.
        const int64_t e0 = r0 * channels, e1 = r1 * channels;
        const int64_t k1 = (r1 == rows) ? (n + 7) / 8 : e1 / 8;
        if (gamma) {
          const U* z = z_block.data();
          pack_range(bits, e0 / 8, k1, n, [z, e0](int64_t e) { return z[e - e0] >= 0; });
        } else {
          pack_range(bits, e0 / 8, k1, n, [x](int64_t e) { return value(x[e]) >= 0; });
        }
        double* sums = partial.data() + b * channels;
        for (int64_t c = 0; c < channels; ++c) sums[c] = static_cast<double>(acc[c]);
      }
    });
    for (int64_t c = 0; c < channels; ++c) {
      double total = 0.0;
      for (int64_t b = 0; b < blocks; ++b) total += partial[b * channels + c];
      omega[c] = rows ? static_cast<U>(total / static_cast<double>(rows)) : U(NAN);
    }
  }
};

REGISTER_OP("LqpBinaryBatchNormGrad")
    .Input("dx: T")
    .Input("bits: uint8")
    .Input("psi: U")
    .Input("levels: U")
    .Input("gamma: U")
    .Input("planes: uint8")
    .Output("dy: T")
    .Output("dbeta: U")
    .Output("dgamma: U")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double} = DT_FLOAT")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle y;
      DimensionHandle channels;
      TF_RETURN_IF_ERROR(channels_last(c, &y, &channels));
      c->set_output(0, y);
      c->set_output(1, c->Vector(channels));
      c->set_output(2, c->Vector(channels));
      return tensorflow::OkStatus();
    })
    .Doc("dy = gamma (dx - mean(dx) - mean(dx a) s) / psi with s = +-1 from bits and "
         "a = s * levels[bin, channel], the bin from the bit planes ([b, bytes], b = 0: "
         "bin 0, levels = omega); dbeta = sum(dx); dgamma = sum(dx a). gamma = 1: no scale. "
         "Arithmetic in U, dy rounded to T once.");

template <typename T, typename U>
class BinaryBatchNormGradOp : public OpKernel {
 public:
  explicit BinaryBatchNormGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dx_t = ctx->input(0);
    OP_REQUIRES(ctx, dx_t.dims() >= 1, InvalidArgument("LqpBinaryBatchNormGrad: dx needs rank >= 1"));
    const int64_t channels = dx_t.dim_size(dx_t.dims() - 1);
    const int64_t n = dx_t.NumElements();
    const int64_t rows = channels ? n / channels : 0;
    OP_REQUIRES(ctx, ctx->input(1).NumElements() == (n + 7) / 8,
                InvalidArgument("LqpBinaryBatchNormGrad: bits need ", (n + 7) / 8, " bytes, got ",
                                ctx->input(1).NumElements()));
    for (int i : {2, 4}) {
      OP_REQUIRES(ctx, ctx->input(i).NumElements() == channels,
                  InvalidArgument("LqpBinaryBatchNormGrad: psi, gamma need ", channels,
                                  " elements"));
    }
    const Tensor& planes_t = ctx->input(5);
    OP_REQUIRES(ctx, planes_t.dims() == 2 && planes_t.dim_size(1) == (n + 7) / 8 &&
                         planes_t.dim_size(0) <= 3,
                InvalidArgument("LqpBinaryBatchNormGrad: planes need shape [bits <= 3, ",
                                (n + 7) / 8, "], got ", planes_t.shape().DebugString()));
    const int planes_count = static_cast<int>(planes_t.dim_size(0));
    OP_REQUIRES(ctx, ctx->input(3).NumElements() == (int64_t{1} << planes_count) * channels,
                InvalidArgument("LqpBinaryBatchNormGrad: levels need 2^bits x ", channels,
                                " elements, got ", ctx->input(3).NumElements()));
    const T* dx = dx_t.flat<T>().data();
    const uint8_t* bits = ctx->input(1).flat<uint8_t>().data();
    const U* psi = ctx->input(2).flat<U>().data();
    const U* levels = ctx->input(3).flat<U>().data();
    const U* gamma = ctx->input(4).flat<U>().data();
    const uint8_t* planes = planes_t.flat<uint8_t>().data();
    const int64_t plane_bytes = (n + 7) / 8;
    Tensor *dy_t = nullptr, *dbeta_t, *dgamma_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({channels}), &dbeta_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({channels}), &dgamma_t));
    U* dbeta = dbeta_t->flat<U>().data();
    U* dgamma = dgamma_t->flat<U>().data();
    const int64_t per_block = block_rows(channels);
    const int64_t blocks = (rows + per_block - 1) / per_block;
    std::vector<double> partial(static_cast<size_t>(2 * blocks * channels));
    // Sweep 1: sum(dx) and sum(dx * a) per channel, a = s * levels[bin].
    parallel_for(ctx, blocks, per_block * channels * (4 + planes_count), [&](int64_t b0, int64_t b1) {
      std::vector<U> sum(channels), corr(channels), level(channels);
      std::vector<uint8_t> m(channels), bin(channels), plane(channels);
      if (planes_count == 0) std::copy(levels, levels + channels, level.begin());  // omega
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(sum.begin(), sum.end(), U(0));
        std::fill(corr.begin(), corr.end(), U(0));
        const int64_t r1 = std::min(rows, (b + 1) * per_block);
        for (int64_t r = b * per_block; r < r1; ++r) {
          const T* g = dx + r * channels;
          expand_bits(bits, r * channels, channels, m.data());
          if (planes_count > 0) {
            std::fill(bin.begin(), bin.end(), uint8_t{0});
            for (int p = 0; p < planes_count; ++p) {
              expand_bits(planes + p * plane_bytes, r * channels, channels, plane.data());
              for (int64_t c = 0; c < channels; ++c) bin[c] |= static_cast<uint8_t>(plane[c] << p);
            }
            for (int64_t c = 0; c < channels; ++c) level[c] = levels[bin[c] * channels + c];
          }
          for (int64_t c = 0; c < channels; ++c) {
            const U gc = widen<U>(g[c]);
            sum[c] += gc;
            const U ga = gc * level[c];
            corr[c] += blend(m[c], ga, static_cast<U>(-ga));
          }
        }
        double* out = partial.data() + 2 * b * channels;
        for (int64_t c = 0; c < channels; ++c) {
          out[c] = static_cast<double>(sum[c]);
          out[channels + c] = static_cast<double>(corr[c]);
        }
      }
    });
    std::vector<U> centre(channels), k(channels);
    for (int64_t c = 0; c < channels; ++c) {
      double s = 0.0, q = 0.0;
      for (int64_t b = 0; b < blocks; ++b) {
        s += partial[2 * b * channels + c];
        q += partial[2 * b * channels + channels + c];
      }
      const U count = static_cast<U>(rows);
      dbeta[c] = static_cast<U>(s);
      dgamma[c] = static_cast<U>(q);
      centre[c] = static_cast<U>(s) / count;
      k[c] = static_cast<U>(q) / count;
    }
    // dy may take dx's buffer.
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, dx_t.shape(), &dy_t));
    T* dy = dy_t->flat<T>().data();
    // Sweep 2: dy, in the reference's order of operations.
    std::vector<U> plus(channels), minus(channels);  // the shift for s = +1 and s = -1
    for (int64_t c = 0; c < channels; ++c) {
      plus[c] = k[c] + centre[c];
      minus[c] = -k[c] + centre[c];
    }
    parallel_for(ctx, rows, channels * 4, [&](int64_t r0, int64_t r1) {
      std::vector<uint8_t> m(channels);
      for (int64_t r = r0; r < r1; ++r) {
        const T* g = dx + r * channels;
        T* out = dy + r * channels;
        expand_bits(bits, r * channels, channels, m.data());
        for (int64_t c = 0; c < channels; ++c) {
          const U shift = blend(m[c], plus[c], minus[c]);
          out[c] = narrow<T>(gamma[c] * ((widen<U>(g[c]) - shift) / psi[c]));
        }
      }
    });
  }
};

// ------------------------------------ BinaryBatchNorm(proposed, magnitude_bits)
REGISTER_OP("LqpMagnitudeBins")
    .Input("x: T")
    .Input("omega: U")
    .Output("planes: uint8")
    .Output("levels: U")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double} = DT_FLOAT")
    .Attr("edges: list(float)")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, bits;
      DimensionHandle channels;
      TF_RETURN_IF_ERROR(channels_last(c, &x, &channels));
      std::vector<float> edges;
      TF_RETURN_IF_ERROR(c->GetAttr("edges", &edges));
      const int64_t levels = static_cast<int64_t>(edges.size()) + 1;
      int64_t planes = 0;
      while ((int64_t{1} << planes) < levels) ++planes;
      TF_RETURN_IF_ERROR(packed_shape(c, x, &bits));
      c->set_output(0, c->Matrix(planes, c->Dim(bits, 0)));
      c->set_output(1, c->Matrix(levels, channels));
      return tensorflow::OkStatus();
    })
    .Doc("The bin of |x| (how many of omega * edges it reaches) as bit planes, and each "
         "bin's mean |x| per channel (0 for an empty bin).");

template <typename T, typename U>
class MagnitudeBinsOp : public OpKernel {
 public:
  explicit MagnitudeBinsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("edges", &edges_));
    const int64_t levels = static_cast<int64_t>(edges_.size()) + 1;
    planes_ = 0;
    while ((int64_t{1} << planes_) < levels) ++planes_;
    OP_REQUIRES(ctx, (int64_t{1} << planes_) == levels && planes_ >= 1 && planes_ <= 3,
                InvalidArgument("LqpMagnitudeBins: edges need 2^bits - 1 values, bits 1..3, got ",
                                edges_.size()));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_t = ctx->input(0);
    OP_REQUIRES(ctx, x_t.dims() >= 1, InvalidArgument("LqpMagnitudeBins: x needs rank >= 1"));
    const int64_t channels = x_t.dim_size(x_t.dims() - 1);
    OP_REQUIRES(ctx, ctx->input(1).NumElements() == channels,
                InvalidArgument("LqpMagnitudeBins: omega needs ", channels, " elements"));
    const int64_t n = x_t.NumElements();
    const int64_t rows = channels ? n / channels : 0;
    const int64_t levels = int64_t{1} << planes_;
    const int64_t plane_bytes = (n + 7) / 8;
    Tensor *planes_t, *levels_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({planes_, plane_bytes}), &planes_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({levels, channels}), &levels_t));
    const T* x = x_t.flat<T>().data();
    const U* omega = ctx->input(1).flat<U>().data();
    uint8_t* planes = planes_t->flat<uint8_t>().data();
    U* out_levels = levels_t->flat<U>().data();
    // The edges per channel in U, as the reference computes them (omega * edge).
    std::vector<U> edge(edges_.size() * channels);
    for (size_t j = 0; j < edges_.size(); ++j) {
      for (int64_t c = 0; c < channels; ++c) edge[j * channels + c] = omega[c] * static_cast<U>(edges_[j]);
    }
    const int64_t n_edges = static_cast<int64_t>(edges_.size());
    auto bin_of = [&](int64_t e) {
      const int64_t c = e % channels;
      const U m = std::abs(widen<U>(x[e]));
      int b = 0;
      for (int64_t j = 0; j < n_edges; ++j) b += m >= edge[j * channels + c];
      return b;
    };
    const int64_t per_block = block_rows(channels);
    const int64_t blocks = (rows + per_block - 1) / per_block;
    std::vector<double> partial(static_cast<size_t>(2 * levels * blocks * channels));
    parallel_for(ctx, blocks, per_block * channels * (4 + 2 * n_edges), [&](int64_t b0, int64_t b1) {
      std::vector<U> sums(levels * channels), counts(levels * channels);
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(sums.begin(), sums.end(), U(0));
        std::fill(counts.begin(), counts.end(), U(0));
        const int64_t r0 = b * per_block, r1 = std::min(rows, (b + 1) * per_block);
        for (int64_t r = r0; r < r1; ++r) {
          const T* in = x + r * channels;
          for (int64_t c = 0; c < channels; ++c) {
            const U m = std::abs(widen<U>(in[c]));
            int bin = 0;
            for (int64_t j = 0; j < n_edges; ++j) bin += m >= edge[j * channels + c];
            sums[bin * channels + c] += m;
            counts[bin * channels + c] += U(1);
          }
        }
        const int64_t e0 = r0 * channels, e1 = r1 * channels;
        const int64_t k1 = (r1 == rows) ? plane_bytes : e1 / 8;
        for (int p = 0; p < planes_; ++p) {
          pack_range(planes + p * plane_bytes, e0 / 8, k1, n,
                     [&bin_of, p](int64_t e) { return (bin_of(e) >> p) & 1; });
        }
        double* out = partial.data() + 2 * levels * b * channels;
        for (int64_t i = 0; i < levels * channels; ++i) {
          out[i] = static_cast<double>(sums[i]);
          out[levels * channels + i] = static_cast<double>(counts[i]);
        }
      }
    });
    for (int64_t i = 0; i < levels * channels; ++i) {
      double sum = 0.0, count = 0.0;
      for (int64_t b = 0; b < blocks; ++b) {
        sum += partial[2 * levels * b * channels + i];
        count += partial[2 * levels * b * channels + levels * channels + i];
      }
      out_levels[i] = count > 0 ? static_cast<U>(sum / count) : U(0);
    }
  }

 private:
  std::vector<float> edges_;
  int64_t planes_;
};

// ------------------------------------------------------------- bit packing
namespace {

// signs like x; then `packed` outputs of x's packed size; then the NaN flags.
Status sign_and_pack_shape(InferenceContext* c, int packed) {
  ShapeHandle bits;
  c->set_output(0, c->input(0));
  TF_RETURN_IF_ERROR(packed_shape(c, c->input(0), &bits));
  for (int i = 1; i <= packed; ++i) c->set_output(i, bits);
  if (!c->RankKnown(c->input(0))) {
    c->set_output(packed + 1, c->UnknownShape());
  } else {
    const int rank = c->Rank(c->input(0));
    std::vector<DimensionHandle> dims(rank, c->MakeDim(1));
    if (rank) dims[0] = c->Dim(c->input(0), 0);
    c->set_output(packed + 1, c->MakeShape(dims));
  }
  return tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("LqpSignAndPack")
    .Input("x: T")
    .Output("signs: S")
    .Output("bits: uint8")
    .Output("nan_rows: bool")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("S: {half, bfloat16, float, double}")
    .Attr("nan_signs: bool = false")
    .Attr("nan_elements: bool = false")
    .SetShapeFn([](InferenceContext* c) { return sign_and_pack_shape(c, 1); })
    .Doc("sign(x) (+1 where x >= 0, -1 elsewhere), the packed bits of x >= 0 and whether each "
         "sample (slice along axis 0) holds a NaN, [batch, 1, ...] (bitpack.nan_rows), in one "
         "pass over x. With nan_signs, the signs of a sample holding a NaN are all NaN; with "
         "nan_elements, the signs of the NaN elements (larq.math.sign's). The signs in S: T, or "
         "float for a 16-bit x (a 16-bit kernel read in float32).");

REGISTER_OP("LqpSignMaskAndPack")
    .Input("x: T")
    .Input("bound: T")
    .Output("signs: S")
    .Output("bits: uint8")
    .Output("mask: uint8")
    .Output("nan_rows: bool")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("S: {half, bfloat16, float, double}")
    .Attr("nan_signs: bool = false")
    .Attr("nan_elements: bool = false")
    .SetShapeFn([](InferenceContext* c) { return sign_and_pack_shape(c, 2); })
    .Doc("LqpSignAndPack, and in the same pass the packed bits of -bound <= x <= bound (the "
         "mask of a clipped straight-through estimator; false at NaN).");

// Masked: the op with the mask of -bound <= x <= bound (LqpSignMaskAndPack); signs in S.
template <typename T, typename S, bool Masked>
class SignAndPackOp : public OpKernel {
 public:
  explicit SignAndPackOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nan_signs", &nan_signs_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nan_elements", &nan_elements_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_t = ctx->input(0);
    const int64_t n = x_t.NumElements();
    const int rank = x_t.dims();
    const int64_t samples = rank ? x_t.dim_size(0) : 1;
    const int64_t per_sample = samples ? n / samples : 0;
    TensorShape flag_shape;
    for (int i = 0; i < rank; ++i) flag_shape.AddDim(i ? 1 : samples);
    Tensor *signs_t = nullptr, *bits_t, *mask_t = nullptr, *nan_t;
    const int nan_output = Masked ? 3 : 2;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({(n + 7) / 8}), &bits_t));
    if (Masked) {
      OP_REQUIRES(ctx, ctx->input(1).NumElements() == 1,
                  InvalidArgument("LqpSignMaskAndPack: bound must be a scalar"));
      OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({(n + 7) / 8}), &mask_t));
    }
    OP_REQUIRES_OK(ctx, ctx->allocate_output(nan_output, flag_shape, &nan_t));
    const T* x = x_t.flat<T>().data();
    uint8_t* bits = bits_t->flat<uint8_t>().data();
    uint8_t* mask_bits = Masked ? mask_t->flat<uint8_t>().data() : nullptr;
    const auto bound = Masked ? value(ctx->input(1).flat<T>()(0)) : value(T(0.0f));
    const int64_t bytes = (n + 7) / 8;
    // Per-sample flags, set by whichever chunk meets a NaN (relaxed stores of 1).
    std::unique_ptr<std::atomic<bool>[]> nan(new std::atomic<bool>[samples]);
    for (int64_t r = 0; r < samples; ++r) nan[r].store(false, std::memory_order_relaxed);
    // The signs may overwrite x's buffer in place (same type): each chunk reads its x first.
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x_t.shape(), &signs_t));
    S* signs = signs_t->flat<S>().data();
    const S plus(1.0f), minus(-1.0f), not_a_number(NAN);
    const bool nan_elements = nan_elements_;
    parallel_for(ctx, (bytes + kChunkBytes - 1) / kChunkBytes, kChunkBytes * 48,
                 [&](int64_t c0, int64_t c1) {
      uint8_t m[8 * kChunkBytes];
      uint8_t inside[Masked ? 8 * kChunkBytes : 1];
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        const int64_t k0 = chunk * kChunkBytes, k1 = std::min(bytes, k0 + kChunkBytes);
        const int64_t e0 = 8 * k0, len = std::min(n, 8 * k1) - e0;
        // The bits of x >= 0 (and of -bound <= x <= bound), and for the samples
        // this chunk overlaps any NaN (v != v) in its part of each: one loop per
        // sample part (vectorizes).
        for (int64_t j = 0; j < len;) {
          const int64_t sample = (e0 + j) / per_sample;
          const int64_t end = std::min(len, (sample + 1) * per_sample - e0);
          uint8_t any = 0;
          for (int64_t i = j; i < end; ++i) {
            const auto v = value(x[e0 + i]);
            m[i] = v >= 0;
            if (Masked) inside[i] = (v <= bound) & (v >= -bound);
            any |= static_cast<uint8_t>(v != v);
          }
          if (any) nan[sample].store(true, std::memory_order_relaxed);
          j = end;
        }
        pack_bytes(m, k0, k1, n, bits);
        if (Masked) pack_bytes(inside, k0, k1, n, mask_bits);
        if (nan_elements) {  // x is read before its element of the signs is written
          for (int64_t j = 0; j < len; ++j) {
            const auto v = value(x[e0 + j]);
            signs[e0 + j] = numeric::pick(v != v, not_a_number, blend(m[j], plus, minus));
          }
        } else {
          for (int64_t j = 0; j < len; ++j) signs[e0 + j] = blend(m[j], plus, minus);
        }
      }
    });
    bool* flags = nan_t->flat<bool>().data();
    for (int64_t r = 0; r < samples; ++r) {
      flags[r] = nan[r].load(std::memory_order_relaxed);
      if (flags[r] && nan_signs_) {  // rare: the only second pass, over that sample's signs
        std::fill(signs + r * per_sample, signs + (r + 1) * per_sample, not_a_number);
      }
    }
  }

 private:
  bool nan_signs_ = false;
  bool nan_elements_ = false;
};

REGISTER_OP("LqpPackSigns")
    .Input("x: T")
    .Output("bits: uint8")
    .Attr("T: {half, bfloat16, float, double}")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle bits;
      TF_RETURN_IF_ERROR(packed_shape(c, c->input(0), &bits));
      c->set_output(0, bits);
      return tensorflow::OkStatus();
    })
    .Doc("The packed bits of x >= 0 (LqpSignAndPack's bits), without the signs: for tensors "
         "kept as bits whose signs nothing reads (a binary kernel kept for the backward pass).");

// Output 0: the n bits `bit(e)` (e = 0 .. n-1) packed into ceil(n / 8) bytes, in
// parallel chunks of kChunkBytes bytes.
template <typename Bit>
void pack_output(OpKernelContext* ctx, int64_t n, int64_t cost_per_chunk, Bit bit) {
  Tensor* bits_t;
  OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({(n + 7) / 8}), &bits_t));
  uint8_t* bits = bits_t->flat<uint8_t>().data();
  const int64_t bytes = (n + 7) / 8;
  parallel_for(ctx, (bytes + kChunkBytes - 1) / kChunkBytes, cost_per_chunk,
               [&](int64_t c0, int64_t c1) {
    uint8_t m[8 * kChunkBytes];
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t k0 = chunk * kChunkBytes, k1 = std::min(bytes, k0 + kChunkBytes);
      const int64_t e0 = 8 * k0, len = std::min(n, 8 * k1) - e0;
      for (int64_t j = 0; j < len; ++j) m[j] = bit(e0 + j);
      pack_bytes(m, k0, k1, n, bits);
    }
  });
}

template <typename T>
class PackSignsOp : public OpKernel {
 public:
  explicit PackSignsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_t = ctx->input(0);
    const T* x = x_t.flat<T>().data();
    pack_output(ctx, x_t.NumElements(), kChunkBytes * 24,
                [x](int64_t e) -> uint8_t { return value(x[e]) >= 0.0f; });
  }
};

REGISTER_OP("LqpPackBits")
    .Input("mask: bool")
    .Output("bits: uint8")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle bits;
      TF_RETURN_IF_ERROR(packed_shape(c, c->input(0), &bits));
      c->set_output(0, bits);
      return tensorflow::OkStatus();
    })
    .Doc("Packs a boolean tensor into ceil(n / 8) bytes.");

class PackBitsOp : public OpKernel {
 public:
  explicit PackBitsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& mask_t = ctx->input(0);
    const bool* mask = mask_t.flat<bool>().data();
    pack_output(ctx, mask_t.NumElements(), kChunkBytes * 16,
                [mask](int64_t e) -> uint8_t { return mask[e]; });
  }
};

REGISTER_OP("LqpUnpackBits")
    .Input("bits: uint8")
    .Input("shape: int32")
    .Input("on: T")
    .Input("off: T")
    .Output("values: T")
    .Attr("T: {bool, uint8, int32, half, bfloat16, float, double}")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle out;
      TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(1, &out));
      c->set_output(0, out);
      return tensorflow::OkStatus();
    })
    .Doc("A tensor of `shape`: `on` where the bit is set, `off` elsewhere.");

template <typename T>
class UnpackBitsOp : public OpKernel {
 public:
  explicit UnpackBitsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& bits_t = ctx->input(0);
    TensorShape shape;
    OP_REQUIRES_OK(ctx, tensorflow::tensor::MakeShape(ctx->input(1), &shape));
    const int64_t n = shape.num_elements();
    OP_REQUIRES(ctx, bits_t.NumElements() * 8 >= n,
                InvalidArgument("LqpUnpackBits: ", bits_t.NumElements(), " bytes hold fewer than ",
                                n, " bits"));
    OP_REQUIRES(ctx, ctx->input(2).NumElements() == 1 && ctx->input(3).NumElements() == 1,
                InvalidArgument("LqpUnpackBits: on and off must be scalars"));
    Tensor* out_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out_t));
    const uint8_t* bits = bits_t.flat<uint8_t>().data();
    const T on = ctx->input(2).flat<T>()(0), off = ctx->input(3).flat<T>()(0);
    T* out = out_t->flat<T>().data();
    const int64_t bytes = (n + 7) / 8;
    parallel_for(ctx, (bytes + kChunkBytes - 1) / kChunkBytes, kChunkBytes * 24,
                 [&](int64_t c0, int64_t c1) {
      uint8_t m[8 * kChunkBytes];
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        const int64_t e0 = 8 * chunk * kChunkBytes;
        const int64_t len = std::min(n, e0 + 8 * kChunkBytes) - e0;
        expand_bits(bits, e0, len, m);
        for (int64_t j = 0; j < len; ++j) out[e0 + j] = blend(m[j], on, off);
      }
    });
  }
};

REGISTER_OP("LqpApplyMask")
    .Input("dx: T")
    .Input("bits: uint8")
    .Input("inside: T")
    .Input("outside: T")
    .Output("out: R")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("R: {half, bfloat16, float, double}")
    .Attr("select: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return tensorflow::OkStatus();
    })
    .Doc("dx * (bit ? inside : outside); with select, bit ? dx : 0 (no NaN from dx outside). "
         "The result in R: T, or 16-bit for a float dx (a 16-bit kernel's gradient), rounded once.");

template <typename T, typename R>
class ApplyMaskOp : public OpKernel {
 public:
  explicit ApplyMaskOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("select", &select_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dx_t = ctx->input(0);
    const int64_t n = dx_t.NumElements();
    OP_REQUIRES(ctx, ctx->input(1).NumElements() == (n + 7) / 8,
                InvalidArgument("LqpApplyMask: bits need ", (n + 7) / 8, " bytes, got ",
                                ctx->input(1).NumElements()));
    OP_REQUIRES(ctx, ctx->input(2).NumElements() == 1 && ctx->input(3).NumElements() == 1,
                InvalidArgument("LqpApplyMask: inside and outside must be scalars"));
    const T* dx = dx_t.flat<T>().data();
    const uint8_t* bits = ctx->input(1).flat<uint8_t>().data();
    const T inside = ctx->input(2).flat<T>()(0), outside = ctx->input(3).flat<T>()(0);
    Tensor* out_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, dx_t.shape(), &out_t));
    R* out = out_t->flat<R>().data();
    const bool select = select_;
    const int64_t bytes = (n + 7) / 8;
    const T zero(0.0f);
    parallel_for(ctx, (bytes + kChunkBytes - 1) / kChunkBytes, kChunkBytes * 32,
                 [&](int64_t c0, int64_t c1) {
      uint8_t m[8 * kChunkBytes];
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        const int64_t e0 = 8 * chunk * kChunkBytes;
        const int64_t len = std::min(n, e0 + 8 * kChunkBytes) - e0;
        expand_bits(bits, e0, len, m);
        const T* g = dx + e0;
        R* o = out + e0;
        if (select) {
          for (int64_t j = 0; j < len; ++j) o[j] = narrow<R>(value(blend(m[j], g[j], zero)));
        } else {
          for (int64_t j = 0; j < len; ++j) o[j] = narrow<R>(value(g[j]) * value(blend(m[j], inside, outside)));
        }
      }
    });
  }

 private:
  bool select_;
};

// ------------------------------------------------------- bit-mask max pool
REGISTER_OP("LqpFirstMaxBits")
    .Input("x: T")
    .Input("y: T")
    .Output("bits: uint8")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("pool: list(int)")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
      std::vector<int> pool;
      TF_RETURN_IF_ERROR(c->GetAttr("pool", &pool));
      int64_t n = 1;
      for (int i = 0; i < 4; ++i) {
        const int64_t d = c->Value(c->Dim(x, i));
        if (d < 0 || pool.size() != 2) {
          c->set_output(0, c->Vector(InferenceContext::kUnknownDim));
          return tensorflow::OkStatus();
        }
        n *= (i == 1 || i == 2) ? d / pool[i - 1] * pool[i - 1] : d;
      }
      c->set_output(0, c->Vector((n + 7) / 8));
      return tensorflow::OkStatus();
    })
    .Doc("Bits over the windows [B, Ho, p, Wo, q, C] of an NHWC 'VALID' pool with strides = "
         "pool: set at each window's first element equal to y, or at its first element when "
         "that is NaN or when none equals y (MaxPoolGrad's choice).");

template <typename T>
class FirstMaxBitsOp : public OpKernel {
 public:
  explicit FirstMaxBitsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::vector<int> pool;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("pool", &pool));
    OP_REQUIRES(ctx, pool.size() == 2 && pool[0] > 0 && pool[1] > 0,
                InvalidArgument("LqpFirstMaxBits: pool must be two positive ints"));
    p_ = pool[0];
    q_ = pool[1];
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_t = ctx->input(0);
    const Tensor& y_t = ctx->input(1);
    OP_REQUIRES(ctx, x_t.dims() == 4 && y_t.dims() == 4,
                InvalidArgument("LqpFirstMaxBits: x and y must be NHWC"));
    const int64_t batch = x_t.dim_size(0), height = x_t.dim_size(1), width = x_t.dim_size(2);
    const int64_t channels = x_t.dim_size(3);
    const int64_t ho = y_t.dim_size(1), wo = y_t.dim_size(2);
    OP_REQUIRES(ctx, y_t.dim_size(0) == batch && y_t.dim_size(3) == channels && ho == height / p_ &&
                         wo == width / q_,
                InvalidArgument("LqpFirstMaxBits: y is not the pool of x"));
    const int64_t p = p_, q = q_;
    const int64_t row_elems = p * wo * q * channels;  // one output row of windows
    const int64_t n = batch * ho * row_elems;
    Tensor* bits_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({(n + 7) / 8}), &bits_t));
    uint8_t* bits = bits_t->flat<uint8_t>().data();
    std::memset(bits, 0, static_cast<size_t>((n + 7) / 8));
    const T* x = x_t.flat<T>().data();
    const T* y = y_t.flat<T>().data();
    const int64_t units = batch * ho;
    // A unit (an output row) owns its bytes when its bit count is a multiple of 8.
    const bool aligned = row_elems % 8 == 0;
    auto unit = [&](int64_t u) {
      const int64_t b = u / ho, r = u % ho;
      for (int64_t col = 0; col < wo; ++col) {
        for (int64_t c = 0; c < channels; ++c) {
          const T target = y[((b * ho + r) * wo + col) * channels + c];
          auto at = [&](int64_t i, int64_t j) {
            return x[((b * height + r * p + i) * width + col * q + j) * channels + c];
          };
          int64_t best = 0;
          if (!std::isnan(value(at(0, 0)))) {
            for (int64_t k = 0; k < p * q; ++k) {
              if (at(k / q, k % q) == target) {
                best = k;
                break;
              }
            }
          }
          const int64_t e = u * row_elems + ((best / q) * wo * q + col * q + best % q) * channels + c;
          bits[e >> 3] |= static_cast<uint8_t>(1u << (7 - (e & 7)));
        }
      }
    };
    // Channels in whole bytes: per window, one pass over each position's channels
    // as 0/1 bytes (first match so far, vectorizable), then 8 bytes packed into one
    // byte of bits each, stored once. The scalar loop above (divisions, a branch
    // per match, single-bit writes) is ~10x slower; it serves the other shapes.
    // The flags are held in W's integer width while they are compared (one
    // width per loop: the loops vectorize), narrowed to bytes to be packed.
    using W = numeric::Work<T>;
    using A = numeric::Bits<W>;
    auto byte_units = [&](int64_t u0, int64_t u1) {
      std::vector<A> first(static_cast<size_t>(p * q * channels));
      std::vector<A> done(static_cast<size_t>(channels));
      std::vector<W> top(static_cast<size_t>(channels));
      std::vector<uint8_t> flags(static_cast<size_t>(channels));
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / ho, r = u % ho;
        for (int64_t col = 0; col < wo; ++col) {
          const T* target = y + ((b * ho + r) * wo + col) * channels;
          for (int64_t c = 0; c < channels; ++c) top[c] = value(target[c]);
          for (int64_t i = 0; i < p; ++i) {
            for (int64_t j = 0; j < q; ++j) {
              const T* xs = x + ((b * height + r * p + i) * width + col * q + j) * channels;
              A* f = first.data() + (i * q + j) * channels;
              if (i == 0 && j == 0) {  // a NaN first element is the window's pick
                for (int64_t c = 0; c < channels; ++c) {
                  const W v = value(xs[c]);
                  const A hit = static_cast<A>((v == top[c]) | (v != v));
                  f[c] = hit;
                  done[c] = hit;
                }
              } else {
                for (int64_t c = 0; c < channels; ++c) {
                  const A hit = static_cast<A>(value(xs[c]) == top[c]);
                  f[c] = hit & static_cast<A>(1 - done[c]);
                  done[c] |= hit;
                }
              }
            }
          }
          // No element equals the max (a NaN elsewhere in the window): the first.
          for (int64_t c = 0; c < channels; ++c) first[c] |= static_cast<A>(1 - done[c]);
          for (int64_t i = 0; i < p; ++i) {
            for (int64_t j = 0; j < q; ++j) {
              const int64_t e = u * row_elems + (i * wo * q + col * q + j) * channels;
              const A* f = first.data() + (i * q + j) * channels;
              for (int64_t c = 0; c < channels; ++c) flags[c] = static_cast<uint8_t>(f[c]);
              uint8_t* out = bits + (e >> 3);
              for (int64_t c = 0; c < channels; c += 8) out[c >> 3] = pack_bytes(flags.data() + c);
            }
          }
        }
      }
    };
    if (channels % 8 == 0) {
      parallel_for(ctx, units, row_elems, byte_units);
    } else if (aligned) {
      parallel_for(ctx, units, row_elems * 2, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; ++u) unit(u);
      });
    } else {
      for (int64_t u = 0; u < units; ++u) unit(u);
    }
  }

 private:
  int p_, q_;
};

REGISTER_OP("LqpUnpoolBits")
    .Input("dy: T")
    .Input("bits: uint8")
    .Input("input_shape: int32")
    .Output("dx: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("pool: list(int)")
    .SetShapeFn(shape_from_input_2)
    .Doc("dx of the bit-mask max pool: dy at the set bits of each window, 0 elsewhere "
         "(and in the rows and columns beyond the last full window).");

template <typename T>
class UnpoolBitsOp : public OpKernel {
 public:
  explicit UnpoolBitsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::vector<int> pool;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("pool", &pool));
    OP_REQUIRES(ctx, pool.size() == 2 && pool[0] > 0 && pool[1] > 0,
                InvalidArgument("LqpUnpoolBits: pool must be two positive ints"));
    p_ = pool[0];
    q_ = pool[1];
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy_t = ctx->input(0);
    TensorShape shape;
    OP_REQUIRES_OK(ctx, tensorflow::tensor::MakeShape(ctx->input(2), &shape));
    OP_REQUIRES(ctx, dy_t.dims() == 4 && shape.dims() == 4,
                InvalidArgument("LqpUnpoolBits: dy and input_shape must be NHWC"));
    const int64_t batch = shape.dim_size(0), height = shape.dim_size(1), width = shape.dim_size(2);
    const int64_t channels = shape.dim_size(3);
    const int64_t ho = dy_t.dim_size(1), wo = dy_t.dim_size(2);
    const int64_t p = p_, q = q_;
    OP_REQUIRES(ctx, dy_t.dim_size(0) == batch && dy_t.dim_size(3) == channels &&
                         ho == height / p && wo == width / q,
                InvalidArgument("LqpUnpoolBits: dy is not the pool of input_shape"));
    const int64_t n = batch * ho * p * wo * q * channels;
    OP_REQUIRES(ctx, ctx->input(1).NumElements() == (n + 7) / 8,
                InvalidArgument("LqpUnpoolBits: bits need ", (n + 7) / 8, " bytes"));
    Tensor* dx_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &dx_t));
    const T* dy = dy_t.flat<T>().data();
    const uint8_t* bits = ctx->input(1).flat<uint8_t>().data();
    T* dx = dx_t->flat<T>().data();
    const int64_t cropped_w = wo * q;
    parallel_for(ctx, batch * height, width * channels * 2, [&](int64_t u0, int64_t u1) {
      std::vector<uint8_t> m(cropped_w * channels);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / height, h = u % height;
        T* out = dx + u * width * channels;
        if (h >= ho * p) {
          std::fill(out, out + width * channels, T(0.0f));
          continue;
        }
        const T* g = dy + (b * ho + h / p) * wo * channels;
        const int64_t e0 = (b * ho * p + h) * cropped_w * channels;
        expand_bits(bits, e0, cropped_w * channels, m.data());
        const T zero(0.0f);
        for (int64_t w = 0; w < cropped_w; ++w) {
          const T* gw = g + (w / q) * channels;
          const uint8_t* mw = m.data() + w * channels;
          T* o = out + w * channels;
          for (int64_t c = 0; c < channels; ++c) o[c] = blend(mw[c], gw[c], zero);
        }
        std::fill(out + cropped_w * channels, out + width * channels, T(0.0f));
      }
    });
  }

 private:
  int p_, q_;
};

// ---------------------------------------------------- argmax max pool
// Any window (p * q <= 256 elements), strides, 'SAME' / 'VALID', NHWC. The
// argmax offset k = i * q + j of each output is kept in `bits` bit planes:
// bit b of the offset of flat output e is packed element b * N + e (N outputs),
// as larq_prox/ops/pooling.py's `_pack_offsets` packs them.
namespace {

struct PoolGeometry {
  int64_t batch = 0, height = 0, width = 0, channels = 0;
  int64_t p = 1, q = 1, s = 1, t = 1;
  int64_t out_rows = 0, out_cols = 0, pad_top = 0, pad_left = 0;
  int bits = 0;
  int64_t outputs() const { return batch * out_rows * out_cols * channels; }
  int64_t packed_bytes() const { return (bits * outputs() + 7) / 8; }
};

// TF's output size and padding before (GetWindowedOutputSize); false when 'VALID'
// has no window (the input is smaller than the pool).
bool axis_geometry(int64_t size, int64_t pool, int64_t stride, bool same, int64_t* out,
                   int64_t* before) {
  if (same) {
    *out = (size + stride - 1) / stride;
    *before = std::max<int64_t>((*out - 1) * stride + pool - size, 0) / 2;
    return true;
  }
  *before = 0;
  *out = size >= pool ? (size - pool) / stride + 1 : 0;
  return size >= pool;
}

// ceil(log2(window)): the bits of an offset in [0, window).
int offset_bits(int64_t window) {
  int bits = 0;
  while ((int64_t{1} << bits) < window) ++bits;
  return bits;
}

Status pool_attrs(OpKernelConstruction* ctx, PoolGeometry* g, bool* same) {
  std::vector<int> ksize, strides;
  std::string padding;
  TF_RETURN_IF_ERROR(ctx->GetAttr("ksize", &ksize));
  TF_RETURN_IF_ERROR(ctx->GetAttr("strides", &strides));
  TF_RETURN_IF_ERROR(ctx->GetAttr("padding", &padding));
  if (ksize.size() != 2 || strides.size() != 2 || *std::min_element(ksize.begin(), ksize.end()) < 1 ||
      *std::min_element(strides.begin(), strides.end()) < 1) {
    return InvalidArgument("LqpArgmaxMaxPool: ksize and strides must be two positive ints each");
  }
  if (ksize[0] * ksize[1] > 256) {
    return InvalidArgument("LqpArgmaxMaxPool: windows of at most 256 elements (uint8 offsets), got ",
                           ksize[0], "x", ksize[1]);
  }
  g->p = ksize[0];
  g->q = ksize[1];
  g->s = strides[0];
  g->t = strides[1];
  g->bits = offset_bits(g->p * g->q);
  *same = padding == "SAME";
  return tensorflow::OkStatus();
}

Status set_spatial(PoolGeometry* g, bool same, int64_t batch, int64_t height, int64_t width,
                   int64_t channels) {
  g->batch = batch;
  g->height = height;
  g->width = width;
  g->channels = channels;
  if (!axis_geometry(height, g->p, g->s, same, &g->out_rows, &g->pad_top) ||
      !axis_geometry(width, g->q, g->t, same, &g->out_cols, &g->pad_left)) {
    return InvalidArgument("LqpArgmaxMaxPool: a ", height, "x", width, " input is smaller than the ",
                           g->p, "x", g->q, " window of a 'VALID' pool");
  }
  return tensorflow::OkStatus();
}

// A pool window: the offset of its top-left element (padding included: may
// be negative), its valid rows [i_lo, i_hi) and columns [j_lo, j_hi) (q
// columns in all), and the strides of an input row and column, in elements.
struct Window {
  int64_t origin, i_lo, i_hi, j_lo, j_hi, q, row_stride, col_stride;
};

// Channels per block of the window loop: a block's running max, argmax value
// and offset stay in registers / L1 over the whole window, and the loop over a
// block of known length vectorizes without a remainder. 16x112x112x64 3x3/2,
// one thread: 5.2 ms with the window loop outside whole-row vectors, 2.2 ms
// in blocks of 64 (3.5 ms if the length is not known at compile time).
constexpr int64_t kPoolLanes = 64;

// One window's max (MaxPool's: from lowest, NaN never taken) and argmax
// offset (MaxPoolGrad's: the first valid element, whatever its value, then
// strictly greater ones) for `count` channels of x from channel `c0` (only
// the window's valid elements are read). Lanes > 0: count == Lanes; 0: count
// < kPoolLanes (the tail). Offsets held in W's width: every select is a bit
// mask of one width, so the loops vectorize.
template <int64_t Lanes, typename T, typename W = numeric::Work<T>>
inline void window_argmax(const T* x, int64_t c0, const Window& w, int64_t count, W lowest,
                          T* out, uint8_t* offsets) {
  using A = numeric::Bits<W>;
  const int64_t len = Lanes > 0 ? Lanes : count;
  W best[kPoolLanes], top[kPoolLanes];
  A a[kPoolLanes];
  const T* v0 = x + (w.origin + w.i_lo * w.row_stride + w.j_lo * w.col_stride + c0);
  const A k0 = static_cast<A>(w.i_lo * w.q + w.j_lo);
  for (int64_t c = 0; c < len; ++c) {
    const W e = value(v0[c]);
    best[c] = e;
    a[c] = k0;
    top[c] = numeric::pick(lowest < e, e, lowest);
  }
  for (int64_t i = w.i_lo; i < w.i_hi; ++i) {
    for (int64_t j = w.j_lo; j < w.j_hi; ++j) {
      if (i == w.i_lo && j == w.j_lo) continue;
      const T* v = x + (w.origin + i * w.row_stride + j * w.col_stride + c0);
      const A k = static_cast<A>(i * w.q + j);
      for (int64_t c = 0; c < len; ++c) {
        const W e = value(v[c]);
        const bool take = best[c] < e;
        best[c] = numeric::pick(take, e, best[c]);
        a[c] = numeric::pick(take, k, a[c]);
        top[c] = numeric::pick(top[c] < e, e, top[c]);
      }
    }
  }
  for (int64_t c = 0; c < len; ++c) {
    out[c0 + c] = narrow<T>(top[c]);  // exact: a value of T
    offsets[c0 + c] = static_cast<uint8_t>(a[c]);
  }
}

// A byte of a bit plane shared with another unit's bits: OR-ed in after the loop.
struct PartialByte {
  int64_t index;
  uint8_t value;
};

// m[0, len) (0 / 1) as bits [start, start + len): whole bytes assigned, the (at
// most 2) bytes shared with bits outside the range appended to `partial`.
inline int write_bits(uint8_t* bits, int64_t start, const uint8_t* m, int64_t len,
                      PartialByte* partial) {
  int count = 0;
  int64_t e = start, j = 0;
  if (e & 7) {
    uint8_t v = 0;
    const int64_t byte = e >> 3;
    for (; j < len && (e & 7); ++j, ++e) v |= static_cast<uint8_t>(m[j] << (7 - (e & 7)));
    partial[count++] = {byte, v};
  }
  for (; j + 8 <= len; j += 8, e += 8) bits[e >> 3] = pack_bytes(m + j);
  if (j < len) {
    uint8_t v = 0;
    const int64_t byte = e >> 3;
    for (; j < len; ++j, ++e) v |= static_cast<uint8_t>(m[j] << (7 - (e & 7)));
    partial[count++] = {byte, v};
  }
  return count;
}

Status pool_shape(InferenceContext* c) {
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
  std::vector<int> ksize, strides;
  std::string padding;
  TF_RETURN_IF_ERROR(c->GetAttr("ksize", &ksize));
  TF_RETURN_IF_ERROR(c->GetAttr("strides", &strides));
  TF_RETURN_IF_ERROR(c->GetAttr("padding", &padding));
  if (ksize.size() != 2 || strides.size() != 2) {
    return InvalidArgument("LqpArgmaxMaxPool: ksize and strides must be two ints each");
  }
  std::vector<DimensionHandle> dims = {c->Dim(x, 0), c->UnknownDim(), c->UnknownDim(), c->Dim(x, 3)};
  int64_t n = c->Value(c->Dim(x, 0)) * c->Value(c->Dim(x, 3));
  bool known = c->ValueKnown(c->Dim(x, 0)) && c->ValueKnown(c->Dim(x, 3));
  for (int a = 0; a < 2; ++a) {
    const DimensionHandle d = c->Dim(x, a + 1);
    if (!c->ValueKnown(d)) {
      known = false;
      continue;
    }
    int64_t out, before;
    axis_geometry(c->Value(d), ksize[a], std::max(strides[a], 1), padding == "SAME", &out, &before);
    dims[a + 1] = c->MakeDim(out);
    n *= out;
  }
  c->set_output(0, c->MakeShape(dims));
  const int bits = offset_bits(static_cast<int64_t>(ksize[0]) * ksize[1]);
  c->set_output(1, c->Vector(known ? (bits * n + 7) / 8 : InferenceContext::kUnknownDim));
  return tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("LqpArgmaxMaxPool")
    .Input("x: T")
    .Output("y: T")
    .Output("packed: uint8")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("ksize: list(int)")
    .Attr("strides: list(int)")
    .Attr("padding: {'SAME', 'VALID'}")
    .SetShapeFn(pool_shape)
    .Doc("tf.nn.max_pool2d (NHWC) and, packed as bit planes, each window's offset (row-major) "
         "of the element MaxPoolGrad routes dy to: the first valid one, replaced by a strictly "
         "greater one. y is the maximum of the non-NaN elements, at least the lowest float.");

template <typename T>
class ArgmaxMaxPoolOp : public OpKernel {
 public:
  explicit ArgmaxMaxPoolOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, pool_attrs(ctx, &geometry_, &same_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_t = ctx->input(0);
    OP_REQUIRES(ctx, x_t.dims() == 4, InvalidArgument("LqpArgmaxMaxPool: x must be NHWC"));
    PoolGeometry g = geometry_;
    OP_REQUIRES_OK(ctx, set_spatial(&g, same_, x_t.dim_size(0), x_t.dim_size(1), x_t.dim_size(2),
                                    x_t.dim_size(3)));
    Tensor *y_t, *packed_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({g.batch, g.out_rows, g.out_cols, g.channels}), &y_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({g.packed_bytes()}), &packed_t));
    const T* x = x_t.flat<T>().data();
    T* y = y_t->flat<T>().data();
    uint8_t* packed = packed_t->flat<uint8_t>().data();
    if (g.packed_bytes()) std::memset(packed, 0, static_cast<size_t>(g.packed_bytes()));
    const int64_t channels = g.channels, row = g.out_cols * channels, n = g.outputs();
    const int64_t units = g.batch * g.out_rows;  // one output row each
    const int bits = g.bits;
    std::vector<PartialByte> partial(static_cast<size_t>(units * 2 * bits));
    std::vector<int> partial_count(static_cast<size_t>(units), 0);
    // Compared in the arithmetic type W (16-bit elements widened exactly):
    // window_argmax, by blocks of kPoolLanes channels.
    using W = numeric::Work<T>;
    const W lowest = value(Eigen::NumTraits<T>::lowest());
    const int64_t full = channels / kPoolLanes * kPoolLanes;
    parallel_for(ctx, units, row * g.p * g.q * 4, [&](int64_t u0, int64_t u1) {
      std::vector<uint8_t> arg(row), plane(row);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / g.out_rows, ho = u % g.out_rows;
        const int64_t h0 = ho * g.s - g.pad_top;
        const int64_t i_lo = std::max<int64_t>(0, -h0), i_hi = std::min<int64_t>(g.p, g.height - h0);
        for (int64_t wo = 0; wo < g.out_cols; ++wo) {
          const int64_t w0 = wo * g.t - g.pad_left;
          const int64_t j_lo = std::max<int64_t>(0, -w0), j_hi = std::min<int64_t>(g.q, g.width - w0);
          const Window w{((b * g.height + h0) * g.width + w0) * channels, i_lo, i_hi, j_lo, j_hi,
                         g.q, g.width * channels, channels};
          T* out = y + (u * g.out_cols + wo) * channels;
          uint8_t* offsets = arg.data() + wo * channels;
          for (int64_t c = 0; c < full; c += kPoolLanes) {
            window_argmax<kPoolLanes>(x, c, w, kPoolLanes, lowest, out, offsets);
          }
          if (full < channels) window_argmax<0>(x, full, w, channels - full, lowest, out, offsets);
        }
        int count = 0;
        PartialByte* mine = partial.data() + u * 2 * bits;
        for (int plane_bit = 0; plane_bit < bits; ++plane_bit) {
          for (int64_t e = 0; e < row; ++e) plane[e] = (arg[e] >> plane_bit) & 1;
          count += write_bits(packed, plane_bit * n + u * row, plane.data(), row, mine + count);
        }
        partial_count[u] = count;
      }
    });
    for (int64_t u = 0; u < units; ++u) {
      for (int i = 0; i < partial_count[u]; ++i) {
        const PartialByte& part = partial[u * 2 * bits + i];
        packed[part.index] |= part.value;
      }
    }
  }

 private:
  PoolGeometry geometry_;
  bool same_ = false;
};

REGISTER_OP("LqpArgmaxMaxPoolGrad")
    .Input("dy: T")
    .Input("packed: uint8")
    .Input("input_shape: int32")
    .Output("dx: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("ksize: list(int)")
    .Attr("strides: list(int)")
    .Attr("padding: {'SAME', 'VALID'}")
    .SetShapeFn(shape_from_input_2)
    .Doc("dx of LqpArgmaxMaxPool from its packed offsets: each dy added at its window's "
         "argmax, in increasing output index from +0 (TF's MaxPoolGrad's sums, bit for bit).");

template <typename T>
class ArgmaxMaxPoolGradOp : public OpKernel {
 public:
  explicit ArgmaxMaxPoolGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, pool_attrs(ctx, &geometry_, &same_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy_t = ctx->input(0);
    TensorShape shape;
    OP_REQUIRES_OK(ctx, tensorflow::tensor::MakeShape(ctx->input(2), &shape));
    OP_REQUIRES(ctx, dy_t.dims() == 4 && shape.dims() == 4,
                InvalidArgument("LqpArgmaxMaxPoolGrad: dy and input_shape must be NHWC"));
    PoolGeometry g = geometry_;
    OP_REQUIRES_OK(ctx, set_spatial(&g, same_, shape.dim_size(0), shape.dim_size(1),
                                    shape.dim_size(2), shape.dim_size(3)));
    OP_REQUIRES(ctx, dy_t.dim_size(0) == g.batch && dy_t.dim_size(1) == g.out_rows &&
                         dy_t.dim_size(2) == g.out_cols && dy_t.dim_size(3) == g.channels,
                InvalidArgument("LqpArgmaxMaxPoolGrad: dy ", dy_t.shape().DebugString(),
                                " is not the pool of ", shape.DebugString()));
    OP_REQUIRES(ctx, ctx->input(1).NumElements() == g.packed_bytes(),
                InvalidArgument("LqpArgmaxMaxPoolGrad: packed needs ", g.packed_bytes(),
                                " bytes, got ", ctx->input(1).NumElements()));
    Tensor* dx_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &dx_t));
    const T* dy = dy_t.flat<T>().data();
    const uint8_t* packed = ctx->input(1).flat<uint8_t>().data();
    T* dx = dx_t->flat<T>().data();
    const int64_t channels = g.channels, row = g.out_cols * channels, n = g.outputs();
    const int64_t in_row = g.width * channels;
    const int bits = g.bits;
    const int64_t covering = (g.p + g.s - 1) / g.s;  // output rows reading an input row, at most
    using W = numeric::Work<T>;
    using A = numeric::Bits<W>;  // offsets in W's width: one-width selects vectorize
    parallel_for(ctx, g.batch * g.height, in_row * covering * 3, [&](int64_t u0, int64_t u1) {
      // An output row's offsets and dy, decoded and widened once for the (up
      // to `covering`) input rows it reaches: slot ho % covering holds row ho.
      std::vector<uint8_t> offsets(row), m(row);
      std::vector<A> wide(static_cast<size_t>(covering * row));
      std::vector<W> grads(static_cast<size_t>(covering * row));
      std::vector<int64_t> held(static_cast<size_t>(covering), -1);
      const T zero(0.0f);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / g.height, h = u % g.height;
        T* acc = dx + u * in_row;
        std::fill(acc, acc + in_row, zero);  // +0, as MaxPoolGrad starts
        const int64_t hp = h + g.pad_top;
        const int64_t ho_lo = hp < g.p ? 0 : (hp - g.p) / g.s + 1;
        const int64_t ho_hi = std::min<int64_t>(hp / g.s + 1, g.out_rows);
        // Outputs in increasing index: rows, then columns; each adds at most once
        // to an input element, so its sum runs in MaxPoolGrad's order.
        for (int64_t ho = ho_lo; ho < ho_hi; ++ho) {
          const int64_t i = hp - ho * g.s;
          const int64_t e0 = (b * g.out_rows + ho) * row;
          const int64_t slot = ho % covering;
          A* o_row = wide.data() + slot * row;
          W* g_row = grads.data() + slot * row;
          if (held[slot] != e0) {
            std::fill(offsets.begin(), offsets.end(), uint8_t{0});
            for (int plane_bit = 0; plane_bit < bits; ++plane_bit) {
              expand_bits(packed, plane_bit * n + e0, row, m.data());
              for (int64_t e = 0; e < row; ++e) offsets[e] |= static_cast<uint8_t>(m[e] << plane_bit);
            }
            for (int64_t e = 0; e < row; ++e) o_row[e] = offsets[e];
            for (int64_t e = 0; e < row; ++e) g_row[e] = value(dy[e0 + e]);
            held[slot] = e0;
          }
          for (int64_t wo = 0; wo < g.out_cols; ++wo) {
            const int64_t w0 = wo * g.t - g.pad_left;
            const int64_t j_lo = std::max<int64_t>(0, -w0), j_hi = std::min<int64_t>(g.q, g.width - w0);
            const A* o = o_row + wo * channels;
            const W* gw = g_row + wo * channels;
            for (int64_t j = j_lo; j < j_hi; ++j) {
              const A k = static_cast<A>(i * g.q + j);
              T* a = acc + (w0 + j) * channels;
              // Adding +0 where not picked leaves a sum unchanged (a sum from +0 is
              // never -0); each sum rounded to T, as T's own addition.
              for (int64_t c = 0; c < channels; ++c) {
                a[c] = narrow<T>(value(a[c]) + numeric::pick(o[c] == k, gw[c], W(0)));
              }
            }
          }
        }
      }
    });
  }

 private:
  PoolGeometry geometry_;
  bool same_ = false;
};

// ------------------------------------------------------------ registration
// BatchNorm kernels: activations in T, statistics and arithmetic in U.
#define LQP_BN(T, U)                                                                         \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("LqpL1Moments").Device(DEVICE_CPU).TypeConstraint<T>("T").TypeConstraint<U>("U"), \
      L1MomentsOp<T, U>);                                                                    \
  REGISTER_KERNEL_BUILDER(Name("LqpBinaryBatchNormForward")                                  \
                              .Device(DEVICE_CPU)                                            \
                              .TypeConstraint<T>("T")                                        \
                              .TypeConstraint<U>("U"),                                       \
                          BinaryBatchNormForwardOp<T, U>);                                   \
  REGISTER_KERNEL_BUILDER(Name("LqpBinaryBatchNormGrad")                                     \
                              .Device(DEVICE_CPU)                                            \
                              .TypeConstraint<T>("T")                                        \
                              .TypeConstraint<U>("U"),                                       \
                          BinaryBatchNormGradOp<T, U>);                                      \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("LqpMagnitudeBins").Device(DEVICE_CPU).TypeConstraint<T>("T").TypeConstraint<U>("U"), \
      MagnitudeBinsOp<T, U>);
LQP_BN(float, float)
LQP_BN(double, double)
LQP_BN(Eigen::half, float)
LQP_BN(Eigen::bfloat16, float)

// Signs in S of an x in T (a 16-bit kernel's signs may be float), and a mask applied to
// a dx in T giving R (a float gradient of a 16-bit kernel rounded once).
#define LQP_SIGNS(T, S)                                                                      \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("LqpSignAndPack").Device(DEVICE_CPU).TypeConstraint<T>("T").TypeConstraint<S>("S"), \
      SignAndPackOp<T, S, false>);                                                           \
  REGISTER_KERNEL_BUILDER(Name("LqpSignMaskAndPack")                                         \
                              .Device(DEVICE_CPU)                                            \
                              .TypeConstraint<T>("T")                                        \
                              .TypeConstraint<S>("S"),                                       \
                          SignAndPackOp<T, S, true>);
#define LQP_APPLY_MASK(T, R)                                                                 \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("LqpApplyMask").Device(DEVICE_CPU).TypeConstraint<T>("T").TypeConstraint<R>("R"), \
      ApplyMaskOp<T, R>);

#define LQP_ELEMENTWISE(T)                                                                   \
  LQP_SIGNS(T, T)                                                                            \
  REGISTER_KERNEL_BUILDER(Name("LqpPackSigns").Device(DEVICE_CPU).TypeConstraint<T>("T"),    \
                          PackSignsOp<T>);                                                   \
  LQP_APPLY_MASK(T, T)                                                                       \
  REGISTER_KERNEL_BUILDER(Name("LqpFirstMaxBits").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          FirstMaxBitsOp<T>);                                                \
  REGISTER_KERNEL_BUILDER(Name("LqpUnpoolBits").Device(DEVICE_CPU).TypeConstraint<T>("T"),   \
                          UnpoolBitsOp<T>);                                                  \
  REGISTER_KERNEL_BUILDER(Name("LqpArgmaxMaxPool").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          ArgmaxMaxPoolOp<T>);                                               \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("LqpArgmaxMaxPoolGrad").Device(DEVICE_CPU).TypeConstraint<T>("T").HostMemory("input_shape"), \
      ArgmaxMaxPoolGradOp<T>);
LQP_ELEMENTWISE(Eigen::half)
LQP_ELEMENTWISE(Eigen::bfloat16)
LQP_ELEMENTWISE(float)
LQP_ELEMENTWISE(double)
LQP_SIGNS(Eigen::half, float)
LQP_SIGNS(Eigen::bfloat16, float)
LQP_APPLY_MASK(float, Eigen::half)
LQP_APPLY_MASK(float, Eigen::bfloat16)

REGISTER_KERNEL_BUILDER(Name("LqpPackBits").Device(DEVICE_CPU), PackBitsOp);

#define LQP_UNPACK(T)                                                                        \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("LqpUnpackBits").Device(DEVICE_CPU).TypeConstraint<T>("T").HostMemory("shape"),   \
      UnpackBitsOp<T>);
LQP_UNPACK(bool)
LQP_UNPACK(uint8_t)
LQP_UNPACK(int32_t)
LQP_UNPACK(Eigen::half)
LQP_UNPACK(Eigen::bfloat16)
LQP_UNPACK(float)
LQP_UNPACK(double)

}  // namespace larq_prox
