// Shared helpers for the C++ CPU kernels: dtype codes, bf16 conversion, raw-pointer arguments.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace mrgfast {

// Dtype codes passed from Python (mrgfast/ops/backends/native/extension.py DTYPE_CODES must match).
enum class DType : int { Float32 = 0, BFloat16 = 1 };

inline DType dtype_from_code(int code, const char* what) {
  if (code == 0) return DType::Float32;
  if (code == 1) return DType::BFloat16;
  throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(code) +
                              " (expected 0 = float32 or 1 = bfloat16)");
}

// bf16 is the high half of an fp32: widening is a shift; narrowing rounds to nearest even (as torch does).
inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Element access for the two storage types; kernels compute in float.
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

// Python passes tensor.data_ptr() as an integer; 0 means "no tensor" for optional arguments.
template <typename T>
inline T* pointer(uintptr_t address) { return reinterpret_cast<T*>(address); }

// Calls fn.template operator()<T>() with T = float or uint16_t (bf16 storage) for a dtype code.
template <typename Fn>
inline void dispatch_dtype(int code, const char* what, Fn&& fn) {
  switch (dtype_from_code(code, what)) {
    case DType::Float32: fn(float{}); break;
    case DType::BFloat16: fn(uint16_t{}); break;
  }
}

}  // namespace mrgfast
