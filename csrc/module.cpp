// Lets `import dmgan._C` load the library built by setup.py; the ops register themselves with
// TORCH_LIBRARY when it loads and are reached through torch.ops.dmgan.
#include <Python.h>

static PyModuleDef dmgan_c_module = {PyModuleDef_HEAD_INIT, "_C", "DM-GAN dynamic-memory kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dmgan_c_module); }
