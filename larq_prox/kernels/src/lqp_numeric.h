// Element conversions and branch-free selects shared by the larq-prox kernels.
//
// 16-bit floats (IEEE half, bfloat16) are converted to and from float32 by
// integer bit manipulation: exact (round to nearest even, as TF's Cast and
// Eigen's conversions), NaN -> quiet NaN of the same sign, and branch-free,
// so that loops over 16-bit tensors vectorize with any ISA (SSE2, AVX2,
// AVX-512, NEON). Eigen's own scalar conversions do not vectorize: a kernel
// looping over Eigen::half that way runs ~3x slower than on float32.
// Selects are bit masks for the same reason (GCC keeps a float `c ? a : b`
// on random conditions as a branch).

#ifndef LARQ_PROX_KERNELS_LQP_NUMERIC_H_
#define LARQ_PROX_KERNELS_LQP_NUMERIC_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tensorflow/core/framework/numeric_types.h"

namespace larq_prox {
namespace numeric {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// All-ones where `condition`, else 0.
inline uint32_t mask(bool condition) { return 0u - static_cast<uint32_t>(condition); }

inline uint32_t select(uint32_t m, uint32_t a, uint32_t b) { return (a & m) | (b & ~m); }

// IEEE half <-> float (Eigen's half_to_float and float_to_half_rtne with
// masks instead of branches).
inline float half_to_float(uint16_t h) {
  const uint32_t shifted_exponent = 0x7c00u << 13;
  const uint32_t bits = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  const uint32_t exponent = bits & shifted_exponent;
  const uint32_t normal = bits + ((127u - 15u) << 23);
  const uint32_t inf_nan = normal + ((128u - 16u) << 23);
  // Subnormal: renormalized by a float subtraction of normal numbers (exact,
  // and unaffected by TF's flush-to-zero of float denormals).
  const uint32_t subnormal = bits_of(float_of(normal + (1u << 23)) - float_of(113u << 23));
  const uint32_t o = select(mask(exponent == shifted_exponent), inf_nan,
                            select(mask(exponent == 0), subnormal, normal));
  return float_of(o | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
}

inline uint16_t float_to_half(float value) {
  const uint32_t bits = bits_of(value);
  const uint32_t sign = bits & 0x80000000u;
  const int32_t f = static_cast<int32_t>(bits ^ sign);  // |value|'s bits: signed compares
  const int32_t f16max = (127 + 16) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t inf_nan = 0x7c00u | (mask(f > (255 << 23)) & 0x0200u);
  // Below 2^-14 the result is subnormal: adding 0.5 aligns its 10 bits at the
  // bottom and the float addition rounds to nearest even.
  const uint32_t subnormal =
      bits_of(float_of(static_cast<uint32_t>(f)) + float_of(denorm_magic)) - denorm_magic;
  const uint32_t u = static_cast<uint32_t>(f);
  const uint32_t normal = (u + ((15u - 127u) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  const uint32_t o = select(mask(f >= f16max), inf_nan,
                            select(mask(f < (113 << 23)), subnormal, normal));
  return static_cast<uint16_t>(o | (sign >> 16));
}

// bfloat16 <-> float: the top half of the float, rounded to nearest even;
// NaN -> quiet NaN of the same sign (as Eigen::bfloat16).
inline float bfloat16_to_float(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bfloat16(float value) {
  const uint32_t f = bits_of(value);
  const uint32_t rounded = (f + 0x7fffu + ((f >> 16) & 1u)) >> 16;
  const uint32_t nan = ((f >> 16) & 0x8000u) | 0x7fc0u;
  const bool is_nan = static_cast<int32_t>(f & 0x7fffffffu) > 0x7f800000;
  return static_cast<uint16_t>(select(mask(is_nan), nan, rounded));
}

template <typename T>
inline uint16_t raw16(T v) {
  static_assert(sizeof(T) == 2, "16-bit types only");
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}

template <typename T>
inline T from_raw16(uint16_t b) {
  T v;
  std::memcpy(&v, &b, 2);
  return v;
}

// The arithmetic type of an element type: float for 16-bit types and float, double for double.
template <typename T>
using Work = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// An element of T as the arithmetic type U (float or double), exactly.
template <typename U = float, typename T>
inline U widen(T v) {
  if constexpr (std::is_same<T, Eigen::half>::value) {
    return static_cast<U>(half_to_float(raw16(v)));
  } else if constexpr (std::is_same<T, Eigen::bfloat16>::value) {
    return static_cast<U>(bfloat16_to_float(raw16(v)));
  } else {
    return static_cast<U>(v);
  }
}

// A float or double value as an element of T, rounded once (a double reaches
// a 16-bit type through float, as Eigen's conversions do).
template <typename T, typename U>
inline T narrow(U v) {
  if constexpr (std::is_same<T, Eigen::half>::value) {
    return from_raw16<T>(float_to_half(static_cast<float>(v)));
  } else if constexpr (std::is_same<T, Eigen::bfloat16>::value) {
    return from_raw16<T>(float_to_bfloat16(static_cast<float>(v)));
  } else {
    return static_cast<T>(v);
  }
}

// The unsigned integer of T's width.
template <typename T>
using Bits = typename std::conditional<sizeof(T) == 1, uint8_t,
             typename std::conditional<sizeof(T) == 2, uint16_t,
             typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type>::type>::type;

// condition ? a : b by bit masks of T's width (no branch; exact for any value).
template <typename T>
inline T pick(bool condition, T a, T b) {
  using B = Bits<T>;
  static_assert(sizeof(B) == sizeof(T), "pick: unsupported element size");
  B ua, ub;
  std::memcpy(&ua, &a, sizeof(T));
  std::memcpy(&ub, &b, sizeof(T));
  const B m = static_cast<B>(B(0) - static_cast<B>(condition));
  const B r = static_cast<B>((ua & m) | (ub & static_cast<B>(~m)));
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

}  // namespace numeric
}  // namespace larq_prox

#endif  // LARQ_PROX_KERNELS_LQP_NUMERIC_H_
