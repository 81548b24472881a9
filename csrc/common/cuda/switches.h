// Environment switches that turn a fast GPU path on or off (to compare against it, to rule it
// out, or to try one not yet on by default).
// Read on every call (one getenv beside a kernel launch) so that a test can flip them within
// one process.
#pragma once

#include <cstdlib>
#include <cstring>

namespace l2p::cuda {

// True when `variable` is set to "0".
inline bool switched_off(const char* variable) {
  const char* value = std::getenv(variable);
  return value != nullptr && std::strcmp(value, "0") == 0;
}

// "1" turns the path on, "0" off; unset (or anything else) leaves `by_default`.
inline bool switched(const char* variable, bool by_default) {
  const char* value = std::getenv(variable);
  if (value != nullptr && std::strcmp(value, "1") == 0) return true;
  if (value != nullptr && std::strcmp(value, "0") == 0) return false;
  return by_default;
}

}  // namespace l2p::cuda
