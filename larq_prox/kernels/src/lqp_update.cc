// Fused optimizer updates of larq-prox (see larq_prox/fused_update.py).
//
// TensorFlow's CPU training ops on Eigen::half / bfloat16 variables
// (ResourceApplyAdam, ResourceApplyKerasMomentum) evaluate each expression in
// 16-bit steps, converting every operand of every operation: 3-8x their
// float32 time. These ops read a 16-bit variable, its 16-bit slots and
// gradient once, compute the same formulas in float32 (with float32
// coefficients), and write each result back rounded once (round to nearest
// even, as TF's casts). Optionally the gradient is first replaced by
// sign(g) * scale (BinaryGradient's binary weight gradient; sign(0) = 0,
// sign(NaN) = NaN), so that no separate sign tensor is made. On float32
// variables the same ops fold that sign and a weight clip into the update:
// one pass where TF's ops take four (Sign, Mul, the update, the clip).
//
// Locking and copy-on-write follow TF's own training ops
// (training_op_helpers.h): the variables' mutexes are taken in address order,
// and a buffer that a pending read still holds is copied before the update.
// Portable C++17: the 16-bit conversions (lqp_numeric.h), sign and clip are
// branch-free integer code (bit masks, no float selects, which GCC keeps as
// branches and so does not vectorize: 3.5x slower), vectorized by the compiler
// for the machine's ISA (no F16C needed); threads come from TensorFlow's CPU
// device pool.

#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/kernels/training_op_helpers.h"
#include "tensorflow/core/lib/core/threadpool.h"
#include "lqp_numeric.h"

namespace larq_prox {
namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::errors::FailedPrecondition;
using tensorflow::errors::InvalidArgument;
using tensorflow::shape_inference::InferenceContext;
using CPUDevice = Eigen::ThreadPoolDevice;

using numeric::bfloat16_to_float;
using numeric::bits_of;
using numeric::float_of;
using numeric::float_to_bfloat16;
using numeric::float_to_half;
using numeric::half_to_float;
using numeric::mask;
using numeric::select;

// sign(x) (sign(0) = 0 with the zero's sign, NaN stays NaN), by bits.
inline float sign_of(float x) {
  const uint32_t b = bits_of(x);
  const int32_t magnitude = static_cast<int32_t>(b & 0x7fffffffu);
  const uint32_t number = mask(magnitude > 0) & mask(magnitude <= 0x7f800000);
  return float_of(select(number, (b & 0x80000000u) | 0x3f800000u, b));
}

template <typename T>
struct Storage;

// How a variable type is stored (Raw) and widened to / rounded from float.
template <>
struct Storage<Eigen::half> {
  using Raw = uint16_t;
  static float load(uint16_t v) { return half_to_float(v); }
  static uint16_t store(float v) { return float_to_half(v); }
};

template <>
struct Storage<Eigen::bfloat16> {
  using Raw = uint16_t;
  static float load(uint16_t v) { return bfloat16_to_float(v); }
  static uint16_t store(float v) { return float_to_bfloat16(v); }
};

template <>
struct Storage<float> {
  using Raw = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};

template <typename T>
using Raw = typename Storage<T>::Raw;

template <typename T>
inline Raw<T>* raw(Tensor& t) {
  static_assert(sizeof(T) == sizeof(Raw<T>), "storage of the variable's width");
  return reinterpret_cast<Raw<T>*>(t.flat<T>().data());
}

template <typename T>
inline const Raw<T>* raw(const Tensor& t) {
  return reinterpret_cast<const Raw<T>*>(t.flat<T>().data());
}

constexpr int64_t kChunk = 1024;  // elements per inner step (float buffers on the stack)

// The gradient as the update reads it: g * scale, or sign(g) * scale
// (sign(0) = 0, NaN stays NaN).
template <typename T>
inline void load_gradient(const Raw<T>* g, int64_t len, bool sign, float scale, float* out) {
  for (int64_t j = 0; j < len; ++j) out[j] = Storage<T>::load(g[j]);
  if (sign) {
    for (int64_t j = 0; j < len; ++j) out[j] = sign_of(out[j]) * scale;
  } else if (scale != 1.0f) {
    for (int64_t j = 0; j < len; ++j) out[j] *= scale;
  }
}

template <typename T>
inline void load(const Raw<T>* in, int64_t len, float* out) {
  for (int64_t j = 0; j < len; ++j) out[j] = Storage<T>::load(in[j]);
}

template <typename T>
inline void store(const float* in, int64_t len, Raw<T>* out) {
  for (int64_t j = 0; j < len; ++j) out[j] = Storage<T>::store(in[j]);
}

// clip_by_value(w, -clip, clip) (a weight_clip constraint folded in; inf: none).
// Clipping before the rounding equals clipping after it when clip is a 16-bit
// value (the rounding is monotone); NaN stays NaN, as in TF's Minimum/Maximum.
inline void clip_values(float* w, int64_t len, float clip) {
  if (std::isinf(clip)) return;
  const uint32_t low = bits_of(-clip), high = bits_of(clip);
  for (int64_t j = 0; j < len; ++j) {
    const float x = w[j];
    const uint32_t below = mask(x < -clip), above = mask(x > clip);
    w[j] = float_of(select(below, low, select(above, high, bits_of(x))));
  }
}

float scalar(OpKernelContext* ctx, int input) { return ctx->input(input).scalar<float>()(); }

// The (locked) variable inputs `ids` as tensors to update in place (copied
// first when a read still holds the buffer), checked for dtype,
// initialization and shape against the gradient at input `grad`.
template <typename T>
tensorflow::Status variables(OpKernelContext* ctx, const char* op, std::initializer_list<int> ids,
                             int grad, Tensor* out) {
  int k = 0;
  for (int id : ids) {
    TF_RETURN_IF_ERROR((tensorflow::GetInputTensorFromVariable<CPUDevice, T>(
        ctx, id, /*lock_held=*/true, /*sparse=*/false, &out[k])));
    if (!out[k].IsInitialized()) {
      return FailedPrecondition(op, ": attempting to use an uninitialized variable: ",
                                ctx->op_kernel().requested_input(id));
    }
    if (out[k].dtype() != tensorflow::DataTypeToEnum<T>::v()) {
      return InvalidArgument(op, ": variable ", ctx->op_kernel().requested_input(id), " is ",
                             tensorflow::DataTypeString(out[k].dtype()), ", the gradient ",
                             tensorflow::DataTypeString(tensorflow::DataTypeToEnum<T>::v()));
    }
    if (out[k].shape() != ctx->input(grad).shape()) {
      return InvalidArgument(op, ": variable ", ctx->op_kernel().requested_input(id), " has shape ",
                             out[k].shape().DebugString(), ", the gradient ",
                             ctx->input(grad).shape().DebugString());
    }
    ++k;
  }
  return tensorflow::OkStatus();
}

tensorflow::Status no_outputs(InferenceContext*) { return tensorflow::OkStatus(); }

}  // namespace

// --------------------------------------------------------------------- Adam
REGISTER_OP("LqpFusedApplyAdam")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("beta1_power: float")
    .Input("beta2_power: float")
    .Input("lr: float")
    .Input("beta1: float")
    .Input("beta2: float")
    .Input("epsilon: float")
    .Input("grad: T")
    .Input("grad_scale: float")
    .Input("clip: float")
    .Attr("T: {half, bfloat16, float}")
    .Attr("sign_gradient: bool = false")
    .Attr("use_locking: bool = false")
    .SetShapeFn(no_outputs)
    .Doc(R"doc(ResourceApplyAdam of a 16-bit or float32 variable in float32 arithmetic, one pass.

g = grad * grad_scale (sign(grad) * grad_scale with sign_gradient),
alpha = lr * sqrt(1 - beta2_power) / (1 - beta1_power),
m += (g - m) * (1 - beta1), v += (g^2 - v) * (1 - beta2),
var -= m * alpha / (sqrt(v) + epsilon), then var = clip_by_value(var, -clip, clip)
(inf: no clip); each stored rounded once.)doc");

template <typename T>
class FusedApplyAdamOp : public OpKernel {
 public:
  explicit FusedApplyAdamOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sign_gradient", &sign_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_locking", &use_locking_));
  }

  void Compute(OpKernelContext* ctx) override {
    auto locks = tensorflow::MaybeLockVariableInputMutexesInOrder<CPUDevice, T>(
        ctx, use_locking_, /*sparse=*/false, {0, 1, 2});
    Tensor tensors[3];
    OP_REQUIRES_OK(ctx, variables<T>(ctx, "LqpFusedApplyAdam", {0, 1, 2}, 9, tensors));
    for (int i = 3; i <= 11; ++i) {
      if (i == 9) continue;
      OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(ctx->input(i).shape()),
                  InvalidArgument("LqpFusedApplyAdam: input ", i, " must be a scalar, got shape ",
                                  ctx->input(i).shape().DebugString()));
    }
    const float beta1_power = scalar(ctx, 3), beta2_power = scalar(ctx, 4), lr = scalar(ctx, 5);
    const float beta1 = scalar(ctx, 6), beta2 = scalar(ctx, 7), epsilon = scalar(ctx, 8);
    const float scale = scalar(ctx, 10), clip = scalar(ctx, 11);
    // TF's ApplyAdamNonCuda, in float32: the same operations in the same order.
    const float alpha = lr * std::sqrt(1.0f - beta2_power) / (1.0f - beta1_power);
    const float one_minus_beta1 = 1.0f - beta1, one_minus_beta2 = 1.0f - beta2;
    Raw<T>* var = raw<T>(tensors[0]);
    Raw<T>* m = raw<T>(tensors[1]);
    Raw<T>* v = raw<T>(tensors[2]);
    const Raw<T>* grad = raw<T>(ctx->input(9));
    const int64_t n = tensors[0].NumElements();
    const bool sign = sign_;
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    pool->ParallelFor((n + kChunk - 1) / kChunk, kChunk * 40, [&](int64_t c0, int64_t c1) {
      float g[kChunk], mf[kChunk], vf[kChunk], wf[kChunk];
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        const int64_t e0 = chunk * kChunk, len = std::min(n, e0 + kChunk) - e0;
        load_gradient<T>(grad + e0, len, sign, scale, g);
        load<T>(m + e0, len, mf);
        load<T>(v + e0, len, vf);
        load<T>(var + e0, len, wf);
        for (int64_t j = 0; j < len; ++j) {
          mf[j] = mf[j] + (g[j] - mf[j]) * one_minus_beta1;
          vf[j] = vf[j] + (g[j] * g[j] - vf[j]) * one_minus_beta2;
          wf[j] = wf[j] - (mf[j] * alpha) / (std::sqrt(vf[j]) + epsilon);
        }
        clip_values(wf, len, clip);
        store<T>(mf, len, m + e0);
        store<T>(vf, len, v + e0);
        store<T>(wf, len, var + e0);
      }
    });
  }

 private:
  bool sign_ = false;
  bool use_locking_ = false;
};

// ------------------------------------------------------------ SGD momentum
REGISTER_OP("LqpFusedApplyMomentum")
    .Input("var: resource")
    .Input("accum: resource")
    .Input("lr: float")
    .Input("grad: T")
    .Input("momentum: float")
    .Input("grad_scale: float")
    .Input("clip: float")
    .Attr("T: {half, bfloat16, float}")
    .Attr("use_nesterov: bool = false")
    .Attr("sign_gradient: bool = false")
    .Attr("use_locking: bool = false")
    .SetShapeFn(no_outputs)
    .Doc(R"doc(ResourceApplyKerasMomentum of a 16-bit or float32 variable in float32 arithmetic, one pass.

g = grad * grad_scale (sign(grad) * grad_scale with sign_gradient),
accum = accum * momentum - g * lr; var += accum, or with use_nesterov
var += accum * momentum - g * lr; then var = clip_by_value(var, -clip, clip)
(inf: no clip); each stored rounded once.)doc");

template <typename T>
class FusedApplyMomentumOp : public OpKernel {
 public:
  explicit FusedApplyMomentumOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_nesterov", &nesterov_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sign_gradient", &sign_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_locking", &use_locking_));
  }

  void Compute(OpKernelContext* ctx) override {
    auto locks = tensorflow::MaybeLockVariableInputMutexesInOrder<CPUDevice, T>(
        ctx, use_locking_, /*sparse=*/false, {0, 1});
    Tensor tensors[2];
    OP_REQUIRES_OK(ctx, variables<T>(ctx, "LqpFusedApplyMomentum", {0, 1}, 3, tensors));
    for (int i : {2, 4, 5, 6}) {
      OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(ctx->input(i).shape()),
                  InvalidArgument("LqpFusedApplyMomentum: input ", i,
                                  " must be a scalar, got shape ",
                                  ctx->input(i).shape().DebugString()));
    }
    const float lr = scalar(ctx, 2), momentum = scalar(ctx, 4), scale = scalar(ctx, 5);
    const float clip = scalar(ctx, 6);
    Raw<T>* var = raw<T>(tensors[0]);
    Raw<T>* accum = raw<T>(tensors[1]);
    const Raw<T>* grad = raw<T>(ctx->input(3));
    const int64_t n = tensors[0].NumElements();
    const bool sign = sign_, nesterov = nesterov_;
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    pool->ParallelFor((n + kChunk - 1) / kChunk, kChunk * 25, [&](int64_t c0, int64_t c1) {
      float g[kChunk], af[kChunk], wf[kChunk];
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        const int64_t e0 = chunk * kChunk, len = std::min(n, e0 + kChunk) - e0;
        load_gradient<T>(grad + e0, len, sign, scale, g);
        load<T>(accum + e0, len, af);
        load<T>(var + e0, len, wf);
        // TF's ApplyKerasMomentum, in float32.
        for (int64_t j = 0; j < len; ++j) af[j] = af[j] * momentum - g[j] * lr;
        if (nesterov) {
          for (int64_t j = 0; j < len; ++j) wf[j] = wf[j] + (af[j] * momentum - g[j] * lr);
        } else {
          for (int64_t j = 0; j < len; ++j) wf[j] = wf[j] + af[j];
        }
        clip_values(wf, len, clip);
        store<T>(af, len, accum + e0);
        store<T>(wf, len, var + e0);
      }
    });
  }

 private:
  bool nesterov_ = false;
  bool sign_ = false;
  bool use_locking_ = false;
};

#define LQP_UPDATE(T)                                                                        \
  REGISTER_KERNEL_BUILDER(Name("LqpFusedApplyAdam").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          FusedApplyAdamOp<T>);                                              \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("LqpFusedApplyMomentum").Device(DEVICE_CPU).TypeConstraint<T>("T"),               \
      FusedApplyMomentumOp<T>);
LQP_UPDATE(Eigen::half)
LQP_UPDATE(Eigen::bfloat16)
LQP_UPDATE(float)

}  // namespace larq_prox
