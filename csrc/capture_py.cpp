// The capture's C++ pieces (lowrank/capture_nodes.h) as Python functions of
// lowrank_kernels._C, with vectorcall argument parsing: ~1 µs per call where a torch.ops call
// boxes its arguments for 10–25 µs. Each holds no GIL while it computes and raises TypeError
// for an argument of the wrong kind (the pieces' own checks raise RuntimeError).
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

#include "lowrank/capture_nodes.h"

namespace {

// The GIL released for a scope (restored on an exception too).
struct WithoutGil {
  PyThreadState* state = PyEval_SaveThread();
  ~WithoutGil() { PyEval_RestoreThread(state); }
};

at::Tensor tensor(PyObject* const* args, Py_ssize_t i, const char* fn) {
  TORCH_CHECK_TYPE(THPVariable_Check(args[i]), fn, ": argument ", i, " must be a tensor");
  return THPVariable_Unpack(args[i]);
}

std::optional<at::Tensor> optional_tensor(PyObject* const* args, Py_ssize_t i, const char* fn) {
  if (args[i] == Py_None) return std::nullopt;
  return tensor(args, i, fn);
}

// A tuple or list of Python ints (a module's stride, padding, dilation).
std::vector<int64_t> ints(PyObject* const* args, Py_ssize_t i, const char* fn) {
  PyObject* obj = args[i];
  const bool list = PyList_Check(obj);
  TORCH_CHECK_TYPE(list || PyTuple_Check(obj), fn, ": argument ", i,
                   " must be a tuple or list of ints");
  const Py_ssize_t n = list ? PyList_GET_SIZE(obj) : PyTuple_GET_SIZE(obj);
  std::vector<int64_t> out(n);
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* v = list ? PyList_GET_ITEM(obj, k) : PyTuple_GET_ITEM(obj, k);
    TORCH_CHECK_TYPE(PyLong_Check(v), fn, ": argument ", i, " must be a tuple or list of ints");
    out[k] = PyLong_AsLongLong(v);
  }
  return out;
}

void arity(Py_ssize_t n, Py_ssize_t expected, const char* fn) {
  TORCH_CHECK_TYPE(n == expected, fn, " takes ", expected, " arguments, got ", n);
}

PyObject* pair(std::tuple<at::Tensor, at::Tensor> t) {
  PyObject* out = PyTuple_New(2);
  if (out == nullptr) return nullptr;
  PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(std::get<0>(t))));  // steals the refs
  PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(std::get<1>(t))));
  return out;
}

// capture_weighted_linear(x, W, b, w, wb, transposed)
PyObject* weighted_linear(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "capture_weighted_linear";
  arity(n, 6, fn);
  const auto x = tensor(args, 0, fn), W = tensor(args, 1, fn), w = tensor(args, 3, fn),
             wb = tensor(args, 4, fn);
  const auto b = optional_tensor(args, 2, fn);
  const bool transposed = PyObject_IsTrue(args[5]);
  at::Tensor y;
  {
    WithoutGil released;
    y = lowrank::capture::weighted_linear(x, W, b, w, wb, transposed);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// capture_weighted_conv2d(x, W, b, w, wb, stride, padding, dilation, groups)
PyObject* weighted_conv2d(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "capture_weighted_conv2d";
  arity(n, 9, fn);
  const auto x = tensor(args, 0, fn), W = tensor(args, 1, fn), w = tensor(args, 3, fn),
             wb = tensor(args, 4, fn);
  const auto b = optional_tensor(args, 2, fn);
  const auto stride = ints(args, 5, fn), padding = ints(args, 6, fn),
             dilation = ints(args, 7, fn);
  TORCH_CHECK_TYPE(PyLong_Check(args[8]), fn, ": groups must be an int");
  const int64_t groups = PyLong_AsLongLong(args[8]);
  at::Tensor y;
  {
    WithoutGil released;
    y = lowrank::capture::weighted_conv2d(x, W, b, w, wb, stride, padding, dilation, groups);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// fn(g, x, mean, invstd, w, wb): one of the weighted affine sums of capture_nodes.h
using AffineSums = std::tuple<at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&);

PyObject* affine_sums(PyObject* const* args, Py_ssize_t n, const char* fn, AffineSums sums) {
  HANDLE_TH_ERRORS
  arity(n, 6, fn);
  std::tuple<at::Tensor, at::Tensor> out;
  const auto g = tensor(args, 0, fn), x = tensor(args, 1, fn), mean = tensor(args, 2, fn),
             invstd = tensor(args, 3, fn), w = tensor(args, 4, fn), wb = tensor(args, 5, fn);
  {
    WithoutGil released;
    out = sums(g, x, mean, invstd, w, wb);
  }
  return pair(std::move(out));
  END_HANDLE_TH_ERRORS
}

// capture_norm_affine_sums(g, x, mean, invstd, w, wb)
PyObject* norm_affine_sums(PyObject*, PyObject* const* args, Py_ssize_t n) {
  return affine_sums(args, n, "capture_norm_affine_sums", &lowrank::capture::norm_affine_sums);
}

// capture_layer_norm_affine_sums(g, x, mean, rstd, a, b)
PyObject* layer_norm_affine_sums(PyObject*, PyObject* const* args, Py_ssize_t n) {
  return affine_sums(args, n, "capture_layer_norm_affine_sums",
                     &lowrank::capture::layer_norm_affine_sums);
}

// capture_hook_norm_affine(y, x, w, wb, weight_slot, bias_slot) -> bool
PyObject* hook_norm_affine(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "capture_hook_norm_affine";
  arity(n, 6, fn);
  const auto y = tensor(args, 0, fn), x = tensor(args, 1, fn), w = tensor(args, 2, fn),
             wb = tensor(args, 3, fn);
  TORCH_CHECK_TYPE(PyLong_Check(args[4]) && PyLong_Check(args[5]), fn,
                   ": the slots must be ints");
  if (lowrank::capture::hook_norm_affine(y, x, w, wb, PyLong_AsLongLong(args[4]),
                                         PyLong_AsLongLong(args[5])))
    Py_RETURN_TRUE;
  Py_RETURN_FALSE;
  END_HANDLE_TH_ERRORS
}

}  // namespace

// Added to the module by ops.cpp's PyInit__C.
PyMethodDef lowrank_capture_methods[] = {
    {"capture_weighted_linear", reinterpret_cast<PyCFunction>(weighted_linear), METH_FASTCALL,
     "Capture.weighted's Linear / Conv1D node (x, W, b, w, wb, transposed)."},
    {"capture_weighted_conv2d", reinterpret_cast<PyCFunction>(weighted_conv2d), METH_FASTCALL,
     "Capture.weighted's Conv2d node (x, W, b, w, wb, stride, padding, dilation, groups)."},
    {"capture_norm_affine_sums", reinterpret_cast<PyCFunction>(norm_affine_sums),
     METH_FASTCALL, "Weighted batch / group norm affine sums (g, x, mean, invstd, w, wb)."},
    {"capture_layer_norm_affine_sums", reinterpret_cast<PyCFunction>(layer_norm_affine_sums),
     METH_FASTCALL, "Weighted layer norm affine sums (g, x, mean, rstd, a, b)."},
    {"capture_hook_norm_affine", reinterpret_cast<PyCFunction>(hook_norm_affine),
     METH_FASTCALL,
     "The weighted affine sums of a norm call as a C++ post-hook on its node, if it can "
     "(y, x, w, wb, weight_slot, bias_slot)."},
    {nullptr, nullptr, 0, nullptr}};
