// Schemas of torch.ops.pathsmc.* and the pybind11 module pathsmc._C (build information).
// The kernels register themselves per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cu.
#include <torch/library.h>
#include <pybind11/pybind11.h>

TORCH_LIBRARY(pathsmc, m) {
  m.def(
      "em_step(Tensor x, Tensor drift, Tensor? logw, float dt, float sigma, Tensor[] ref_drifts, "
      "float[] ref_coefs, float fwd_coef, float fwd_linear, Tensor? noise, Generator? generator, "
      "Tensor? row_dt=None, Tensor? row_sigma=None) -> (Tensor, Tensor)");
  m.def(
      "kernel_logpdf(Tensor y, Tensor base, Tensor? drift, float dt, float sigma, Tensor logw, "
      "float coef, float linear) -> Tensor");
  // The backward passes of em_step and kernel_logpdf (pathsmc._autograd calls them): one pass
  // over the elements; an output whose output_mask entry is false comes back empty (0,)
  // (an empty list for the reference drifts), as does the drift gradient without a drift.
  m.def(
      "em_step_backward(Tensor? grad_x_new, Tensor? grad_logw, Tensor x, Tensor drift, "
      "Tensor? noise, Tensor x_new, float dt, float sigma, Tensor[] ref_drifts, "
      "float[] ref_coefs, float fwd_coef, float fwd_linear, bool[4] output_mask, "
      "Tensor? row_dt=None, Tensor? row_sigma=None) -> (Tensor, Tensor, Tensor[], Tensor)");
  m.def(
      "kernel_logpdf_backward(Tensor grad, Tensor y, Tensor base, Tensor? drift, float dt, "
      "float sigma, float coef, float linear, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("normalize(Tensor logw) -> (Tensor, Tensor, Tensor)");
  m.def(
      "resample(Tensor logw, str scheme, int num_samples, Tensor? uniforms, Generator? generator) "
      "-> Tensor");
  m.def(
      "adaptive_resample(Tensor[] states, Tensor logw, float threshold, str scheme, "
      "Tensor? uniforms, Generator? generator) -> (Tensor[], Tensor, Tensor, Tensor)");
  // In place: every state is gathered into its own storage (extra memory: one row of one
  // state). Not differentiable; pathsmc.ops.adaptive_resample_ refuses states that need grad.
  m.def(
      "adaptive_resample_(Tensor(a!)[] states, Tensor logw, float threshold, str scheme, "
      "Tensor? uniforms, Generator? generator) -> (Tensor, Tensor, Tensor)");
  m.def(
      "mala_accept(Tensor x, Tensor x_prop, Tensor logp, Tensor logp_prop, Tensor grad, "
      "Tensor grad_prop, Tensor step, Tensor? uniforms, Generator? generator) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "replica_swap(Tensor[] states, Tensor log_ratio, int parity, Tensor? uniforms, "
      "Generator? generator) -> (Tensor[], Tensor, Tensor)");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "pathsmc compiled extension: registers torch.ops.pathsmc.*";
  mod.def("build_info", [] {
    py::dict d;
    d["torch_version"] = PATHSMC_TORCH_VERSION;
#ifdef PATHSMC_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["cuda_archs"] = PATHSMC_CUDA_ARCHS;
    return d;
  });
}
