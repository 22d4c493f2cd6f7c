// The Python module of the native extension. Its kernels are registered on the public ops
// (whose schemas the Python package declares, lowrank_kernels/ops/<op>.py) with
// TORCH_LIBRARY_IMPL(lowrank_kernels, CPU|CUDA, m) in <op>.cpp (the CUDA glue there too), so
// the dispatcher calls them without entering Python.
#include <Python.h>

#define LOWRANK_STRINGIFY_(x) #x
#define LOWRANK_STRINGIFY(x) LOWRANK_STRINGIFY_(x)

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

extern PyMethodDef lowrank_layer_check_methods[];  // layer_py_checks.cpp
extern PyMethodDef lowrank_capture_methods[];      // capture_py.cpp

// `import lowrank_kernels._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && (PyModule_AddFunctions(module, lowrank_layer_check_methods) < 0 ||
                            PyModule_AddFunctions(module, lowrank_capture_methods) < 0))
    Py_CLEAR(module);
  return module;
}
