// mrgfast._C: the module object; the ops bind themselves through registry.h.
#include "registry.h"

#include <omp.h>

#include <string>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mrgfast native kernels: C++ CPU kernels (OpenMP) and, when built with CUDA, CUDA kernels";
#ifdef MRGFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("openmp_max_threads", []() { return omp_get_max_threads(); }, "OpenMP's default thread count");
  py::list names;
  for (const auto& [name, bind] : mrgfast::registered_bindings()) {
    bind(m);
    names.append(std::string(name));
  }
  m.attr("registered_ops") = names;
}
