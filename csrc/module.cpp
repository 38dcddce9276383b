// giblet._C as a Python extension module. It holds no Python bindings:
// importing it loads the shared library, whose static initializers register
// the operators with the dispatcher (torch.ops.giblet.*).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "giblet native operators; use them through giblet.ops",
      -1,    // size of per-interpreter state
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}
