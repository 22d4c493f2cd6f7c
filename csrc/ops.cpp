// Every native schema, declared once. Kernels: cpu/<op>.cpp (CPU), cuda/<op>_glue.cpp (CUDA).
// The Python package wraps these native ops in the public torch.ops.lowrank_kernels ops,
// which add the reference and Triton backends and choose among them.
#include <Python.h>
#include <torch/library.h>

#define LOWRANK_STRINGIFY_(x) #x
#define LOWRANK_STRINGIFY(x) LOWRANK_STRINGIFY_(x)

TORCH_LIBRARY(lowrank_native, m) {
  // ---- Gram family ----
  // K = (A A^T + bias) ⊙ (E E^T): A (B x d_in), E (B x d_out) -> K (B x B) float32.
  m.def("gram_linear(Tensor A, Tensor E, bool bias) -> Tensor");
  // ---- weighted sums and projections ----
  // ---- Woodbury solves ----
  // X = (K + λ'I)⁻¹ R, λ' = damping or a rung of the jitter ladder; K (b x n x n, lower triangle
  // read), damping (b), R (b x n x r) -> X (b x n x r), info (b) int32, damping_used (b).
  m.def("woodbury_solve(Tensor K, Tensor damping, Tensor R, float jitter, int max_tries) -> "
        "(Tensor, Tensor, Tensor)");
  // ---- sketches ----
  // Ω[rows, c0:c0+k] (len(rows) x k float32) of the counter-based sketch (lowrank/philox.h).
  m.def("sketch_omega(Tensor rows, int k, int seed, bool rademacher, int col_offset) -> Tensor");
}

namespace {
// _C.build_info(): how this extension was built, "cpu" or "cpu+cuda:<archs>".
PyObject* build_info(PyObject*, PyObject*) {
#ifdef LOWRANK_WITH_CUDA
  return PyUnicode_FromString("cpu+cuda:" LOWRANK_STRINGIFY(LOWRANK_CUDA_ARCHS));
#else
  return PyUnicode_FromString("cpu");
#endif
}
PyMethodDef methods[] = {{"build_info", build_info, METH_NOARGS, "How _C was built."},
                         {nullptr, nullptr, 0, nullptr}};
}  // namespace

// `import lowrank_kernels._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
