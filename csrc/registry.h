// Self-registration of op bindings: each csrc/<op>.cpp adds its functions to mrgfast._C without a central list.
#pragma once

#include <pybind11/pybind11.h>

#include <utility>
#include <vector>

namespace mrgfast {

using BindFunction = void (*)(pybind11::module_&);

// Function-local static: filled by static initialisers of every source file before PyInit__C runs.
inline std::vector<std::pair<const char*, BindFunction>>& registered_bindings() {
  static std::vector<std::pair<const char*, BindFunction>> bindings;
  return bindings;
}

struct RegisterBindings {
  RegisterBindings(const char* name, BindFunction bind) { registered_bindings().emplace_back(name, bind); }
};

}  // namespace mrgfast

// In one .cpp per op: MRGFAST_REGISTER(group_tokens, bind_group_tokens);
#define MRGFAST_REGISTER(name, bind) static ::mrgfast::RegisterBindings mrgfast_register_##name(#name, bind);
