// Environment switches that turn a fast GPU path on or off (to compare against it, to rule it
// out, or to try one not yet on by default).
// Read on every call (one getenv beside a kernel launch) so that a test can flip them within
// one process.
#pragma once

#include <cstdlib>
#include <cstring>

namespace l2p::cuda {

// True when `variable` is set to exactly `value`.
inline bool env_is(const char* variable, const char* value) {
  const char* set = std::getenv(variable);
  return set != nullptr && std::strcmp(set, value) == 0;
}

// True when `variable` is set to "0".
inline bool switched_off(const char* variable) { return env_is(variable, "0"); }

// "1" turns the path on, "0" off; unset (or anything else) leaves `by_default`.
inline bool switched(const char* variable, bool by_default) {
  if (env_is(variable, "1")) return true;
  return by_default && !env_is(variable, "0");
}

}  // namespace l2p::cuda
