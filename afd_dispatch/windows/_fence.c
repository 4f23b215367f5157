/* A full memory barrier for the window protocol (see windows/wait.py, store_fence).
 *
 * A writer stores rows, then the flag that publishes them; a reader reads the flag, then
 * the rows. Python has no fence of its own, and a lock's acquire/release pair does not
 * keep a later store from passing an earlier one on AArch64 (A3 hosts are AArch64).
 * __atomic_thread_fence(__ATOMIC_SEQ_CST) is `mfence` on x86-64 and `dmb ish` on AArch64. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *fence(PyObject *self, PyObject *unused) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fence", fence, METH_NOARGS, "A full (sequentially consistent) memory barrier."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fence", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fence(void) { return PyModule_Create(&module); }
