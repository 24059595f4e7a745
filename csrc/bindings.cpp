// The Python module fastlm._C: pybind11 bindings of the host entry points in kernels.h.
// Compiled by the host compiler (no CUDA headers needed here) and linked with the .cu objects.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "kernels.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlm's CUDA C++ kernels (raw device pointers and a stream; see csrc/kernels.h)";
  m.attr("ABI") = 3;
  // The SM targets with machine code and the PTX target (fastlm/cuda_build.py defines them).
#ifdef FASTLM_SASS_ARCHS
  m.attr("SASS_ARCHS") = std::vector<int>{FASTLM_SASS_ARCHS};
  m.attr("PTX_ARCH") = FASTLM_PTX_ARCH;
#endif  // bumped when an entry point's arguments change; fastlm/ops/_cuda.py checks it
  m.def("norm_fwd", &fastlm::norm_fwd, "layer norm / RMSNorm forward (csrc/norm.cu)", py::arg("dtype"),
        py::arg("x"), py::arg("res"), py::arg("sum"), py::arg("y"), py::arg("w"), py::arg("b"), py::arg("mean"),
        py::arg("rstd"), py::arg("m"), py::arg("n"), py::arg("stride_xm"), py::arg("stride_rm"), py::arg("eps"),
        py::arg("rms"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("norm_bwd", &fastlm::norm_bwd, "layer norm / RMSNorm backward (csrc/norm.cu)", py::arg("dtype"),
        py::arg("x"), py::arg("w"), py::arg("mean"), py::arg("rstd"), py::arg("dy"), py::arg("ds"), py::arg("dx"),
        py::arg("dw_part"), py::arg("db_part"), py::arg("m"), py::arg("n"), py::arg("stride_xm"),
        py::arg("stride_dym"), py::arg("stride_dsm"), py::arg("rms"), py::arg("programs"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("cross_entropy_fwd", &fastlm::cross_entropy_fwd, "cross-entropy forward (csrc/cross_entropy.cu)",
        py::arg("dtype"), py::arg("x"), py::arg("target"), py::arg("loss"), py::arg("lse"), py::arg("coef"),
        py::arg("rows"), py::arg("classes"), py::arg("stride_xr"), py::arg("stride_t"), py::arg("ignore_index"),
        py::arg("smoothing"), py::arg("z_loss"), py::arg("softcap"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("cross_entropy_bwd", &fastlm::cross_entropy_bwd, "cross-entropy backward (csrc/cross_entropy.cu)",
        py::arg("dtype"), py::arg("x"), py::arg("target"), py::arg("lse"), py::arg("coef"), py::arg("dloss"),
        py::arg("dx"), py::arg("rows"), py::arg("classes"), py::arg("stride_xr"), py::arg("stride_t"),
        py::arg("stride_dl"), py::arg("stride_dxr"), py::arg("ignore_index"), py::arg("smoothing"),
        py::arg("softcap"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("attention_fwd", &fastlm::attention_fwd, "flash attention forward (csrc/attention.cu)", py::arg("dtype"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("B"), py::arg("L"),
        py::arg("S"), py::arg("H"), py::arg("HK"), py::arg("D"), py::arg("sqb"), py::arg("sqm"), py::arg("sqh"),
        py::arg("skb"), py::arg("skn"), py::arg("skh"), py::arg("svb"), py::arg("svn"), py::arg("svh"),
        py::arg("scale"), py::arg("bottom_right"), py::arg("window_left"), py::arg("window_right"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("attention_bwd", &fastlm::attention_bwd, "flash attention backward (csrc/attention.cu)", py::arg("dtype"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("dout"), py::arg("lse"), py::arg("delta"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("B"), py::arg("L"), py::arg("S"), py::arg("H"),
        py::arg("HK"), py::arg("D"), py::arg("sqb"), py::arg("sqm"), py::arg("sqh"), py::arg("skb"), py::arg("skn"),
        py::arg("skh"), py::arg("svb"), py::arg("svn"), py::arg("svh"), py::arg("sob"), py::arg("som"),
        py::arg("soh"), py::arg("sdob"), py::arg("sdom"), py::arg("sdoh"), py::arg("scale"),
        py::arg("bottom_right"), py::arg("window_left"), py::arg("window_right"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_smem_bytes", &fastlm::attention_smem_bytes,
        "shared memory of an attention kernel (0 fwd, 1 dq, 2 dk/dv) at head dim D with nc-row walked tiles",
        py::arg("kernel"), py::arg("D"), py::arg("nc"));
  m.def("attention_tile_cols", &fastlm::attention_tile_cols,
        "the walked-tile rows an attention kernel launches with under an opt-in shared-memory limit",
        py::arg("kernel"), py::arg("D"), py::arg("smem_limit"));
  m.def("cuda_runtime_version", &fastlm::cuda_runtime_version, "the CUDA runtime linked in (e.g. 13000)");
  m.def("cuda_driver_version", &fastlm::cuda_driver_version, "the driver's CUDA version (0: no driver)");
}
