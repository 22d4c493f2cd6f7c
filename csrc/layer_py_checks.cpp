// The Conv2d ops' argument checks as Python functions of lowrank_kernels._C (the checks of
// their C++ CPU kernels, lowrank/layer_checks.h, with the same errors as ops/_common.py): the
// Python kernels (Triton on CUDA) call them on plain tensors, ~0.2 µs instead of 1.5–3.5 µs
// of attribute reads in Python. Each returns True when it checked the arguments (raising
// TypeError / ValueError on bad ones) and False when it cannot read them (a tensor subclass
// such as FakeTensor, a non-int in the geometry): the Python check runs then.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

#include "lowrank/gram_tokens.h"
#include "lowrank/layer_checks.h"

namespace {

using Tensors = std::vector<std::optional<at::Tensor>>;

// args[i] as a plain tensor (None: nullopt where `optional`); false where it is not one.
bool tensor_arg(PyObject* obj, bool optional, std::optional<at::Tensor>& out) {
  if (optional && obj == Py_None) return true;
  if (!THPVariable_CheckExact(obj)) return false;
  out = THPVariable_Unpack(obj);
  return true;
}

// A list of exact Python ints (the schema's int[] as the dispatcher hands it).
bool int_list(PyObject* obj, std::vector<int64_t>& out) {
  if (!PyList_CheckExact(obj)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(obj);
  out.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* v = PyList_GET_ITEM(obj, i);
    if (!PyLong_CheckExact(v)) return false;
    int overflow = 0;
    out[i] = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow) return false;
  }
  return true;
}

// check_gram_conv2d(X, E, geometry, X2, E2, diagonal)
PyObject* check_gram_conv2d(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  std::optional<at::Tensor> X, E, X2, E2;
  std::vector<int64_t> geometry;
  if (n != 6 || !tensor_arg(args[0], false, X) || !tensor_arg(args[1], false, E) ||
      !int_list(args[2], geometry) || !tensor_arg(args[3], true, X2) ||
      !tensor_arg(args[4], true, E2) || !PyBool_Check(args[5]))
    Py_RETURN_FALSE;
  constexpr const char* op = "gram_conv2d";
  lowrank::layer::check_conv2d(op, *X, *E, geometry);
  lowrank::gram::check_cross(op, "X2", "E2", *X, *E, X2, E2, args[5] == Py_True);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// check_weighted_sum_conv2d(X, E, c, geometry)
PyObject* check_weighted_sum_conv2d(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  std::optional<at::Tensor> X, E, c;
  std::vector<int64_t> geometry;
  if (n != 4 || !tensor_arg(args[0], false, X) || !tensor_arg(args[1], false, E) ||
      !tensor_arg(args[2], false, c) || !int_list(args[3], geometry))
    Py_RETURN_FALSE;
  constexpr const char* op = "weighted_sum_conv2d";
  lowrank::layer::check_conv2d(op, *X, *E, geometry);
  lowrank::layer::check_coefficients(op, *c, *E);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// check_project_conv2d(X, E, V, V_bias, geometry)
PyObject* check_project_conv2d(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  std::optional<at::Tensor> X, E, V, V_bias;
  std::vector<int64_t> geometry;
  if (n != 5 || !tensor_arg(args[0], false, X) || !tensor_arg(args[1], false, E) ||
      !tensor_arg(args[2], false, V) || !tensor_arg(args[3], true, V_bias) ||
      !int_list(args[4], geometry))
    Py_RETURN_FALSE;
  lowrank::layer::check_project_conv2d(*X, *E, *V, V_bias, geometry);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

}  // namespace

// Added to the module by ops.cpp's PyInit__C.
PyMethodDef lowrank_layer_check_methods[] = {
    {"check_gram_conv2d", reinterpret_cast<PyCFunction>(check_gram_conv2d), METH_FASTCALL,
     "gram_conv2d's argument check (X, E, geometry, X2, E2, diagonal)."},
    {"check_weighted_sum_conv2d", reinterpret_cast<PyCFunction>(check_weighted_sum_conv2d),
     METH_FASTCALL, "weighted_sum_conv2d's argument check (X, E, c, geometry)."},
    {"check_project_conv2d", reinterpret_cast<PyCFunction>(check_project_conv2d),
     METH_FASTCALL, "project_conv2d's argument check (X, E, V, V_bias, geometry)."},
    {nullptr, nullptr, 0, nullptr}};
