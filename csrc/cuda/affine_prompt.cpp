// pybind11 bindings of the affine prompt CUDA launchers (kernels/affine_prompt.cu).
#include "affine_prompt.cuh"
#include "registry.h"

namespace mrgfast {
namespace {

void bind_affine_prompt_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.attr("affine_prompt_cuda_block") = cuda::kAffinePromptBlock;
  m.def("affine_prompt_forward_cuda", &cuda::affine_prompt_forward_cuda,
        "out[b, offsets[b] + l] = (w[b] . P[:, l]) * (1 + gamma) + beta on the given stream",
        py::arg("prompts"), py::arg("gamma"), py::arg("beta"), py::arg("weights"), py::arg("out"),
        py::arg("offsets"), py::arg("batch"), py::arg("book"), py::arg("length"), py::arg("dim"), py::arg("rows"),
        py::arg("per_token"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("affine_prompt_backward_cuda", &cuda::affine_prompt_backward_cuda,
        "dP, dgamma, dbeta, dw of affine_prompt on the given stream (null outputs are skipped)",
        py::arg("grad"), py::arg("prompts"), py::arg("gamma"), py::arg("weights"), py::arg("offsets"),
        py::arg("grad_prompts"), py::arg("grad_gamma"), py::arg("grad_beta"), py::arg("grad_weights"),
        py::arg("dw_partial"), py::arg("batch"), py::arg("book"), py::arg("length"), py::arg("dim"),
        py::arg("rows"), py::arg("per_token"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace
}  // namespace mrgfast

MRGFAST_REGISTER(affine_prompt_cuda, mrgfast::bind_affine_prompt_cuda)
