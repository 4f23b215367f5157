/* The reference ops' three memory-bound loops, in C: whole-row moves, the combine's
 * weighted sum, and int8 row quantization.
 *
 * Python (kernels/reference/native.py) passes raw addresses of tensors it has already
 * checked; every row index read from memory is still bounds-checked here, because the
 * indices may come from a window another process writes. Each loop runs without the GIL.
 *
 * Float semantics match the torch code they replace, bit for bit: built with
 * -ffp-contract=off, so a * b + c is a rounded multiply then a rounded add (never an
 * FMA), and rintf rounds half to even (the default rounding mode). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, NaN to the canonical quiet NaN: c10::BFloat16's conversion. */
static inline uint16_t f32_to_bf16(float f) {
    if (isnan(f)) return 0x7FC0;
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* move_rows(dst, dst_stride, dst_rows, dst_index, src, src_stride, src_rows, src_index,
 *           n, row_bytes) -> -1, or the first i whose index is out of range (nothing of
 * row i or later is written).
 * Row i: dst[dst_index[i]] = src[src_index[i]]; an index address of 0 means "i" itself.
 * Strides are in bytes; indices are int64. */
static PyObject *move_rows(PyObject *self, PyObject *args) {
    unsigned long long dst, dst_index, src, src_index;
    long long dst_stride, dst_rows, src_stride, src_rows, n, row_bytes;
    if (!PyArg_ParseTuple(args, "KLLKKLLKLL", &dst, &dst_stride, &dst_rows, &dst_index, &src,
                          &src_stride, &src_rows, &src_index, &n, &row_bytes))
        return NULL;
    const int64_t *di = (const int64_t *)(uintptr_t)dst_index;
    const int64_t *si = (const int64_t *)(uintptr_t)src_index;
    long long bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n; i++) {
        int64_t d = di ? di[i] : i, s = si ? si[i] : i;
        if (d < 0 || d >= dst_rows || s < 0 || s >= src_rows) {
            bad = i;
            break;
        }
        memcpy((char *)(uintptr_t)dst + d * dst_stride,
               (const char *)(uintptr_t)src + s * src_stride, (size_t)row_bytes);
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(bad);
}

/* weighted_sum(d, w, y, tokens, slots, topk, hidden, dtype)
 * d: [tokens, slots, hidden] contiguous (dtype); w: float32 [tokens, topk] contiguous;
 * y: [tokens, hidden] contiguous (dtype).
 * y[t] = round(((0 + d[t,0]*w[t,0]) + ... + d[t,K-1]*w[t,K-1]) + d[t,K] + ... ), float32
 * throughout, slots in order, one rounding at the end. */
static PyObject *weighted_sum(PyObject *self, PyObject *args) {
    unsigned long long d_addr, w_addr, y_addr;
    long long tokens, slots, topk, hidden;
    int dtype;
    if (!PyArg_ParseTuple(args, "KKKLLLLi", &d_addr, &w_addr, &y_addr, &tokens, &slots, &topk,
                          &hidden, &dtype))
        return NULL;
    if (dtype != DTYPE_F32 && dtype != DTYPE_BF16) {
        PyErr_Format(PyExc_ValueError, "weighted_sum: dtype code %d, expected 0 or 1", dtype);
        return NULL;
    }
    float *acc = (float *)malloc((size_t)hidden * sizeof(float));
    if (acc == NULL) return PyErr_NoMemory();
    const float *w = (const float *)(uintptr_t)w_addr;
    Py_BEGIN_ALLOW_THREADS
    for (long long t = 0; t < tokens; t++) {
        for (long long h = 0; h < hidden; h++) acc[h] = 0.0f;
        for (long long k = 0; k < slots; k++) {
            long long row = (t * slots + k) * hidden;
            if (dtype == DTYPE_BF16) {
                const uint16_t *x = (const uint16_t *)(uintptr_t)d_addr + row;
                if (k < topk) {
                    float wk = w[t * topk + k];
                    for (long long h = 0; h < hidden; h++) acc[h] += bf16_to_f32(x[h]) * wk;
                } else {
                    for (long long h = 0; h < hidden; h++) acc[h] += bf16_to_f32(x[h]);
                }
            } else {
                const float *x = (const float *)(uintptr_t)d_addr + row;
                if (k < topk) {
                    float wk = w[t * topk + k];
                    for (long long h = 0; h < hidden; h++) acc[h] += x[h] * wk;
                } else {
                    for (long long h = 0; h < hidden; h++) acc[h] += x[h];
                }
            }
        }
        if (dtype == DTYPE_BF16) {
            uint16_t *out = (uint16_t *)(uintptr_t)y_addr + t * hidden;
            for (long long h = 0; h < hidden; h++) out[h] = f32_to_bf16(acc[h]);
        } else {
            memcpy((float *)(uintptr_t)y_addr + t * hidden, acc, (size_t)hidden * 4);
        }
    }
    Py_END_ALLOW_THREADS
    free(acc);
    Py_RETURN_NONE;
}

/* quantize_rows(x, n, hidden, dtype, out, out_stride) -> True if every value is finite.
 * x: [n, hidden] contiguous (dtype). Row t of out (out_stride bytes): hidden int8 values
 * q = rint(x * ds) with ds = 127 / amax, amax = max |x|; the float32 scale 1 / ds at byte
 * hidden (0 and q = 0 for an all-zero row); zeros to the end of the row.
 *
 * Written so that the compiler vectorizes every loop without fast-math: finiteness and
 * amax come from integer views of the bits (|x| orders as its bit pattern does), and
 * rounding half to even is the add-and-subtract of 1.5 * 2^23, exact for |v| < 2^22. */
#define ROUNDER 12582912.0f

/* Its own function, with restrict pointers and a plain count: int8 stores could otherwise
 * alias anything, and the loop would not vectorize. */
static void quantize_row(const float *restrict xf, int8_t *restrict q, long long hidden,
                         float ds) {
    for (long long h = 0; h < hidden; h++) {
        float v = xf[h] * ds;
        q[h] = (int8_t)(int32_t)((v + ROUNDER) - ROUNDER);
    }
}

static PyObject *quantize_rows(PyObject *self, PyObject *args) {
    unsigned long long x_addr, out_addr;
    long long n, hidden, out_stride;
    int dtype;
    if (!PyArg_ParseTuple(args, "KLLiKL", &x_addr, &n, &hidden, &dtype, &out_addr, &out_stride))
        return NULL;
    if (dtype != DTYPE_F32 && dtype != DTYPE_BF16) {
        PyErr_Format(PyExc_ValueError, "quantize_rows: dtype code %d, expected 0 or 1", dtype);
        return NULL;
    }
    uint32_t *bits = (uint32_t *)malloc((size_t)hidden * sizeof(uint32_t));
    if (bits == NULL) return PyErr_NoMemory();
    int finite = 1;
    Py_BEGIN_ALLOW_THREADS
    for (long long t = 0; t < n && finite; t++) {
        if (dtype == DTYPE_BF16) {
            const uint16_t *x = (const uint16_t *)(uintptr_t)x_addr + t * hidden;
            for (long long h = 0; h < hidden; h++) bits[h] = (uint32_t)x[h] << 16;
        } else {
            memcpy(bits, (const float *)(uintptr_t)x_addr + t * hidden, (size_t)hidden * 4);
        }
        uint32_t top = 0, special = 0;
        for (long long h = 0; h < hidden; h++) {
            uint32_t magnitude = bits[h] & 0x7FFFFFFFu;
            top = magnitude > top ? magnitude : top;
            special |= (bits[h] & 0x7F800000u) == 0x7F800000u;  /* inf or nan */
        }
        if (special) {
            finite = 0;
            break;
        }
        float amax;
        memcpy(&amax, &top, 4);
        int8_t *q = (int8_t *)(uintptr_t)out_addr + t * out_stride;
        float ds = amax > 0.0f ? 127.0f / amax : 0.0f;
        float scale = amax > 0.0f ? 1.0f / ds : 0.0f;
        quantize_row((const float *)bits, q, hidden, ds);
        memcpy(q + hidden, &scale, 4);
        memset(q + hidden + 4, 0, (size_t)(out_stride - hidden - 4));
    }
    Py_END_ALLOW_THREADS
    free(bits);
    return PyBool_FromLong(finite);
}

static PyMethodDef methods[] = {
    {"move_rows", move_rows, METH_VARARGS, "Move whole rows by index (see the C source)."},
    {"weighted_sum", weighted_sum, METH_VARARGS, "The combine's weighted sum."},
    {"quantize_rows", quantize_rows, METH_VARARGS, "Per-row dynamic int8 quantization."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
