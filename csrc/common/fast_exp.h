// fast_exp: a branch-free float exp that GCC vectorizes, for the CPU kernels (the RNN gates,
// the fused cross-entropy's softmax). Host code only: CUDA code uses the hardware expf.
#pragma once

#include <cstdint>
#include <cstring>

#ifndef __CUDA_ARCH__
namespace turbolm {

// exp(x) for float, branch-free so that GCC vectorizes loops calling it: x = n ln2 + r with
// |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial (relative error < 6e-9 before
// rounding), 2^n built in the exponent bits. x is clamped to [-87, 88] (results for x < -87
// are ~1e-38 instead of smaller, which no gate can tell from 0); NaN stays NaN.
//
// The clamp works on the bit pattern with integer selects: two chained float selects get
// jump-threaded into branches that -ftrapping-math (GCC's default) does not let the
// vectorizer if-convert, and the gate loops would stay scalar.
inline __attribute__((always_inline)) float fast_exp(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t lo = 0xC2AE0000u;  // -87.0f: larger unsigned patterns are more negative
  const uint32_t hi = 0x42B00000u;  // 88.0f: larger signed patterns are larger positives
  u ^= (u ^ lo) & (0u - static_cast<uint32_t>(u > lo));
  const int32_t s = static_cast<int32_t>(u), h = static_cast<int32_t>(hi);
  const int32_t v = s ^ ((s ^ h) & -static_cast<int32_t>(s > h));
  float xc;
  std::memcpy(&xc, &v, sizeof(xc));
  // Round xc / ln2 to the nearest integer with the 1.5 * 2^23 trick (no SSE4.1 round needed).
  const float shifter = 12582912.0f;
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  // r = xc - n ln2 in two parts (Cody-Waite), exact enough for |n| <= 127.
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  // NaN in, NaN out, with integer ops only (a float select here would make GCC sink the
  // whole computation into a branch and not vectorize the loop).
  const float e = p * scale;
  uint32_t e_bits;
  std::memcpy(&e_bits, &e, sizeof(e_bits));
  uint32_t x_bits;
  std::memcpy(&x_bits, &x, sizeof(x_bits));
  e_bits |= 0x7FC00000u & (0u - static_cast<uint32_t>((x_bits & 0x7FFFFFFFu) > 0x7F800000u));
  float result;
  std::memcpy(&result, &e_bits, sizeof(result));
  return result;
}

}  // namespace turbolm
#endif
