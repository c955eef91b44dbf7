// pybind11 bindings of the token-grouping CUDA launchers (kernels/group_tokens.cu).
#include "group_tokens.cuh"
#include "registry.h"

namespace mrgfast {
namespace {

void bind_group_tokens_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.attr("group_tokens_cuda_warps") = cuda::kGroupTokensWarps;
  m.def("group_tokens_forward_cuda", &cuda::group_tokens_forward_cuda,
        "Gather token rows into grouped slots (zeros for padding), optionally LayerNorm-ing each row and writing "
        "per-token mean/rstd, on the given stream; out may be 0 for statistics only",
        py::arg("x"), py::arg("out"), py::arg("mean"), py::arg("rstd"), py::arg("gamma"), py::arg("beta"),
        py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("block_h"), py::arg("block_w"),
        py::arg("dim"), py::arg("eps"), py::arg("normalize"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("group_tokens_backward_cuda", &cuda::group_tokens_backward_cuda,
        "Ungroup gradients (the inverse permutation), optionally through the LayerNorm backward, on the given "
        "stream; dgamma/dbeta go to per-warp fp32 partial rows [warps, dim]; null outputs are skipped",
        py::arg("grad_out"), py::arg("grad_x"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("gamma"),
        py::arg("dgamma_partial"), py::arg("dbeta_partial"), py::arg("warps"), py::arg("batch"),
        py::arg("height"), py::arg("width"), py::arg("block_h"), py::arg("block_w"), py::arg("dim"),
        py::arg("normalize"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace
}  // namespace mrgfast

MRGFAST_REGISTER(group_tokens_cuda, mrgfast::bind_group_tokens_cuda)
