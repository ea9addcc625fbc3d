// The activations of y = residual + dropout(act(x + bias)) and their
// derivatives, as docs/RNG.md ("Activations") defines them.
//
// For float32 math (float16, bfloat16 and float32 inputs) every function is a
// fixed sequence of IEEE +, -, *, / and selects, with no library call: the
// reference (dropout_ext/reference.py), the Triton kernel and the CUDA kernel
// evaluate the same sequence, so all backends agree bit for bit. This only
// holds when the compiler neither contracts a*b+c into an FMA nor reorders:
// the CPU build uses -ffp-contract=off, nvcc --fmad=false, and the Triton
// kernels spell each multiply and add as an explicitly rounded instruction
// (mul.rn/add.rn), which no compiler option can fuse. Float64 math uses the
// C library.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "activation_constants.h"
#include "philox.h"

namespace dropout_ext {

// exp(x) for x <= 0 (every caller passes a non-positive argument). Results
// below exp(-87) are flushed to 0 so no backend depends on subnormal support.
DX_HD float exp_nonpos(float x) {
  const bool in_range = x >= actc::EXP_MIN;  // false for NaN and for tiny results
  const float xc = in_range ? x : 0.0f;
  const float t = xc * actc::LOG2E;
  const float k = (t + actc::ROUND_MAGIC) - actc::ROUND_MAGIC;  // round half even
  const float r = (xc - k * actc::LN2_HI) - k * actc::LN2_LO;   // Cody-Waite ln 2
  float poly = actc::EXP_C7;
  poly = actc::EXP_C6 + r * poly;
  poly = actc::EXP_C5 + r * poly;
  poly = actc::EXP_C4 + r * poly;
  poly = actc::EXP_C3 + r * poly;
  poly = actc::EXP_C2 + r * poly;
  poly = actc::EXP_C1 + r * poly;
  poly = actc::EXP_C0 + r * poly;
  const int32_t ki = static_cast<int32_t>(k);                 // in [-126, 0]
  const float scale = bit_cast<float>(static_cast<uint32_t>(ki + 127) << 23);
  const float e = poly * scale;
  return in_range ? e : (x != x ? x : 0.0f);
}

template <Act A>
struct ActOps;

template <>
struct ActOps<Act::kIdentity> {
  DX_HD static float fwd(float v) { return v; }
  DX_HD static double fwd(double v) { return v; }
};

template <>
struct ActOps<Act::kRelu> {
  DX_HD static float fwd(float v) { return v < 0.0f ? 0.0f : v; }
  DX_HD static double fwd(double v) { return v < 0.0 ? 0.0 : v; }
  DX_HD static bool pass(float v) { return v > 0.0f; }
  DX_HD static bool pass(double v) { return v > 0.0; }
};

// gelu(v) = v/2 * (1 + erf(v / sqrt 2)); erfc by Abramowitz & Stegun 7.1.26,
// evaluated on |v| so the negative tail needs no cancellation.
template <>
struct ActOps<Act::kGelu> {
  struct Parts {
    float cdf2;  // 1 + erf(v / sqrt 2)
    float e;     // exp(-v*v/2)
  };
  DX_HD static Parts parts(float v) {
    const float z = (v < 0.0f ? -v : v) * actc::SQRT1_2;
    const float t = 1.0f / (1.0f + actc::AS_P * z);
    float poly = actc::AS_A1;
    poly = actc::AS_A2 + t * poly;
    poly = actc::AS_A3 + t * poly;
    poly = actc::AS_A4 + t * poly;
    poly = actc::AS_A5 + t * poly;
    poly = t * poly;
    const float e = exp_nonpos(-(z * z));
    const float q = poly * e;  // erfc(|v| / sqrt 2)
    return Parts{v >= 0.0f ? 2.0f - q : q, e};
  }
  DX_HD static float fwd(float v) { return (0.5f * v) * parts(v).cdf2; }
  DX_HD static float grad(float v) {
    const Parts s = parts(v);
    return 0.5f * s.cdf2 + v * (s.e * actc::INV_SQRT_2PI);  // + v * pdf(v)
  }
  DX_HD static double fwd(double v) { return 0.5 * v * (1.0 + erf(v * actc::SQRT1_2_F64)); }
  DX_HD static double grad(double v) {
    return 0.5 * (1.0 + erf(v * actc::SQRT1_2_F64)) + v * exp(-0.5 * v * v) * actc::INV_SQRT_2PI_F64;
  }
};

// gelu_tanh(v) = v/2 * (1 + tanh(u)), u = sqrt(2/pi) (v + 0.044715 v^3), with
// 1 + tanh(u) written through e = exp(-2|u|) so nothing cancels.
template <>
struct ActOps<Act::kGeluTanh> {
  struct Parts {
    float opt;  // 1 + tanh(u)
    float omt;  // 1 - tanh(u)
  };
  DX_HD static Parts parts(float v) {
    const float u = actc::SQRT_2_OVER_PI * (v + actc::GELU_TANH_C * ((v * v) * v));
    const float e = exp_nonpos(-(2.0f * (u < 0.0f ? -u : u)));
    const float d = 1.0f + e;
    const float big = 2.0f / d;
    const float small = (2.0f * e) / d;
    const bool pos = u >= 0.0f;
    return Parts{pos ? big : small, pos ? small : big};
  }
  DX_HD static float fwd(float v) { return (0.5f * v) * parts(v).opt; }
  DX_HD static float grad(float v) {
    const Parts s = parts(v);
    const float du = actc::SQRT_2_OVER_PI * (1.0f + actc::GELU_TANH_3C * (v * v));
    return 0.5f * s.opt + ((0.5f * v) * (s.opt * s.omt)) * du;
  }
  DX_HD static double fwd(double v) {
    const double u = actc::SQRT_2_OVER_PI_F64 * (v + actc::GELU_TANH_C_F64 * v * v * v);
    return 0.5 * v * (1.0 + tanh(u));
  }
  DX_HD static double grad(double v) {
    const double u = actc::SQRT_2_OVER_PI_F64 * (v + actc::GELU_TANH_C_F64 * v * v * v);
    const double t = tanh(u);
    return 0.5 * (1.0 + t) +
           0.5 * v * (1.0 - t * t) * actc::SQRT_2_OVER_PI_F64 * (1.0 + 3.0 * actc::GELU_TANH_C_F64 * v * v);
  }
};

// silu(v) = v * sigmoid(v), the sigmoid from e = exp(-|v|) on either side.
template <>
struct ActOps<Act::kSilu> {
  DX_HD static float sigmoid(float v) {
    const float e = exp_nonpos(v < 0.0f ? v : -v);
    const float d = 1.0f + e;
    return v >= 0.0f ? 1.0f / d : e / d;
  }
  DX_HD static float fwd(float v) { return v * sigmoid(v); }
  DX_HD static float grad(float v) {
    const float s = sigmoid(v);
    return s * (1.0f + v * (1.0f - s));
  }
  DX_HD static double sigmoid(double v) { return 1.0 / (1.0 + exp(-v)); }
  DX_HD static double fwd(double v) { return v * sigmoid(v); }
  DX_HD static double grad(double v) {
    const double s = sigmoid(v);
    return s * (1.0 + v * (1.0 - s));
  }
};

// Gradient through dropout and the activation for one kept element:
// identity and relu select (0 * Inf stays 0, as in threshold_backward), the
// smooth ones multiply by the derivative.
template <Act A, typename acc_t>
DX_HD acc_t act_backward(acc_t g_scaled, acc_t v) {
  if constexpr (A == Act::kIdentity) {
    return g_scaled;
  } else if constexpr (A == Act::kRelu) {
    return ActOps<A>::pass(v) ? g_scaled : acc_t(0);
  } else {
    return g_scaled * ActOps<A>::grad(v);
  }
}


// Calls f(std::integral_constant<Act, act>{}): the one switch from a runtime
// activation to a kernel instantiated for it, for every C++ backend.
template <typename F>
decltype(auto) dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::kRelu: return f(std::integral_constant<Act, Act::kRelu>{});
    case Act::kGelu: return f(std::integral_constant<Act, Act::kGelu>{});
    case Act::kGeluTanh: return f(std::integral_constant<Act, Act::kGeluTanh>{});
    case Act::kSilu: return f(std::integral_constant<Act, Act::kSilu>{});
    case Act::kIdentity:
    default: return f(std::integral_constant<Act, Act::kIdentity>{});
  }
}

}  // namespace dropout_ext
