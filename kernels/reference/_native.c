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

/* 1 if `dtype` is a code the row loops take (DTYPE_F32 or DTYPE_BF16); else 0 with a
 * ValueError naming the loop `fn`. */
static int check_dtype(const char *fn, int dtype) {
    if (dtype == DTYPE_F32 || dtype == DTYPE_BF16) return 1;
    PyErr_Format(PyExc_ValueError, "%s: dtype code %d, expected 0 or 1", fn, dtype);
    return 0;
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

/* weighted_sum(d, w, y, tokens, slots, topk, hidden, dtype) -> True if no sum is NaN
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
    if (!check_dtype("weighted_sum", dtype)) return NULL;
    float *acc = (float *)malloc((size_t)hidden * sizeof(float));
    if (acc == NULL) return PyErr_NoMemory();
    const float *w = (const float *)(uintptr_t)w_addr;
    int no_nan = 1;
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
        for (long long h = 0; h < hidden; h++) no_nan &= acc[h] == acc[h];
        if (dtype == DTYPE_BF16) {
            uint16_t *out = (uint16_t *)(uintptr_t)y_addr + t * hidden;
            for (long long h = 0; h < hidden; h++) out[h] = f32_to_bf16(acc[h]);
        } else {
            memcpy((float *)(uintptr_t)y_addr + t * hidden, acc, (size_t)hidden * 4);
        }
    }
    Py_END_ALLOW_THREADS
    free(acc);
    return PyBool_FromLong(no_nan);
}

/* quantize_rows(x, n, hidden, dtype, out, out_stride, out_len) -> True if every value is
 * finite.
 * x: [n, hidden] contiguous (dtype). Row t of out (out_stride bytes): hidden int8 values
 * q = rint(x * ds) with ds = 127 / amax, amax = max |x|; the float32 scale 1 / ds at byte
 * hidden (0 and q = 0 for an all-zero row); zeros to the end of the row (out_len bytes).
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
    long long out_len;
    if (!PyArg_ParseTuple(args, "KLLiKLL", &x_addr, &n, &hidden, &dtype, &out_addr, &out_stride,
                          &out_len))
        return NULL;
    if (out_len < hidden + 4 || out_stride < out_len) {
        PyErr_Format(PyExc_ValueError, "quantize_rows: rows of %lld bytes, stride %lld, for H=%lld",
                     out_len, out_stride, hidden);
        return NULL;
    }
    if (!check_dtype("quantize_rows", dtype)) return NULL;
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
        memset(q + hidden + 4, 0, (size_t)(out_len - hidden - 4));
    }
    Py_END_ALLOW_THREADS
    free(bits);
    return PyBool_FromLong(finite);
}

/* a2f_scatter(src, src_stride, per_slot, n, topk, slots, ids, ids_elem, first_shared,
 *             table, table_rows, table_cols, session, ffn_start, ffn_ranks, data_rows,
 *             info_rows, slot_stride, row_bytes, touched) -> -1, or the first slot
 * (t * slots + e) whose expert row or destination is out of range (nothing written then:
 * every slot is checked first).
 *
 * npu_attention_to_ffn's data movement for one (session, micro-batch): slot e of token t
 * goes to global expert row g (ids[t, e] for e < topk, first_shared + e - topk after);
 * replica = session % table[g, 0]; FFN rank table[g, 1 + 2 replica] gets the row at
 * position p = t * slots + e of its (session, micro-batch) slots (data_rows[rank -
 * ffn_start] + p * slot_stride: row_bytes from src row t, or p when per_slot) and the
 * local expert id table[g, 2 + 2 replica] in its info row (info_rows[...] int32 [2 + p]);
 * touched[rank - ffn_start] = 1. Every address is the caller's; every index read from a
 * tensor is checked here. */
static PyObject *a2f_scatter(PyObject *self, PyObject *args) {
    unsigned long long src, ids, table, data_rows, info_rows, touched;
    long long src_stride, n, topk, slots, ids_elem, first_shared, table_rows, table_cols;
    long long session, ffn_start, ffn_ranks, slot_stride, row_bytes;
    int per_slot;
    if (!PyArg_ParseTuple(args, "KLiLLLKLLKLLLLLKKLLK", &src, &src_stride, &per_slot, &n, &topk,
                          &slots, &ids, &ids_elem, &first_shared, &table, &table_rows,
                          &table_cols, &session, &ffn_start, &ffn_ranks, &data_rows, &info_rows,
                          &slot_stride, &row_bytes, &touched))
        return NULL;
    const int64_t *tab = (const int64_t *)(uintptr_t)table;
    char **data = (char **)(uintptr_t)data_rows;
    int32_t **info = (int32_t **)(uintptr_t)info_rows;
    uint8_t *hit = (uint8_t *)(uintptr_t)touched;
    long long total = n * slots, bad = -1;
    /* (FFN rank index, local id) per slot: every slot is checked before any is written,
     * and the writes use this snapshot, whatever happens to the table meanwhile */
    int64_t *plan = (int64_t *)malloc((size_t)(total > 0 ? total : 1) * 2 * sizeof(int64_t));
    if (plan == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    for (long long p = 0; p < total; p++) {
        long long t = p / slots, e = p % slots;
        int64_t g;
        if (e < topk)
            g = ids_elem == 4 ? ((const int32_t *)(uintptr_t)ids)[t * topk + e]
                              : ((const int64_t *)(uintptr_t)ids)[t * topk + e];
        else
            g = first_shared + (e - topk);
        if (g < 0 || g >= table_rows) { bad = p; break; }
        const int64_t *row = tab + g * table_cols;
        int64_t count = row[0];
        if (count < 1 || count > (table_cols - 1) / 2) { bad = p; break; }
        int64_t replica = session % count;
        int64_t r = row[1 + 2 * replica] - ffn_start;
        if (r < 0 || r >= ffn_ranks) { bad = p; break; }
        plan[2 * p] = r;
        plan[2 * p + 1] = row[2 + 2 * replica];
    }
    if (bad < 0) {
        for (long long p = 0; p < total; p++) {
            int64_t r = plan[2 * p];
            memcpy(data[r] + p * slot_stride,
                   (const char *)(uintptr_t)src + (per_slot ? p : p / slots) * src_stride,
                   (size_t)row_bytes);
            info[r][2 + p] = (int32_t)plan[2 * p + 1];
            hit[r] = 1;
        }
    }
    Py_END_ALLOW_THREADS
    free(plan);
    return PyLong_FromLongLong(bad);
}

/* f2a_scatter(x, row_bytes, n, sessions, micro_batches, tokens, offsets, session_index,
 *             sessions_num, data_rows, info_rows, micro_batch_num, bs, slots, touched)
 * -> -1, or the first row i whose ids are out of range (checked before anything is written).
 *
 * npu_ffn_to_attention's data movement: row i of x (row_bytes) goes to attention rank
 * a = session_index[sessions[i]] (< 0: not an attention rank, refused) at cell c = (micro_batches[i] * bs + tokens[i]) * slots +
 * offsets[i] of its [M, BS, E] result grid (data_rows[a] + c * row_bytes); then, after a
 * fence, the int32 flag of every such cell (info_rows[a][c]) is set to 1; touched[a] = 1.
 * The id arrays are int32. */
static PyObject *f2a_scatter(PyObject *self, PyObject *args) {
    unsigned long long x, sessions, mbs, toks, offs, session_index, data_rows, info_rows, touched;
    long long row_bytes, n, sessions_num, micro_batch_num, bs, slots;
    if (!PyArg_ParseTuple(args, "KLLKKKKKLKKLLLK", &x, &row_bytes, &n, &sessions, &mbs, &toks,
                          &offs, &session_index, &sessions_num, &data_rows, &info_rows,
                          &micro_batch_num, &bs, &slots, &touched))
        return NULL;
    const int32_t *se = (const int32_t *)(uintptr_t)sessions, *mb = (const int32_t *)(uintptr_t)mbs;
    const int32_t *tk = (const int32_t *)(uintptr_t)toks, *of = (const int32_t *)(uintptr_t)offs;
    const int64_t *index = (const int64_t *)(uintptr_t)session_index;
    char **data = (char **)(uintptr_t)data_rows;
    int32_t **info = (int32_t **)(uintptr_t)info_rows;
    uint8_t *hit = (uint8_t *)(uintptr_t)touched;
    long long bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n; i++) {
        if (se[i] < 0 || se[i] >= sessions_num || index[se[i]] < 0 || mb[i] < 0 ||
            mb[i] >= micro_batch_num || tk[i] < 0 || tk[i] >= bs || of[i] < 0 || of[i] >= slots) {
            bad = i;
            break;
        }
    }
    if (bad < 0) {
        for (long long i = 0; i < n; i++) {
            long long a = index[se[i]];
            long long cell = ((long long)mb[i] * bs + tk[i]) * slots + of[i];
            memcpy(data[a] + cell * row_bytes, (const char *)(uintptr_t)x + i * row_bytes,
                   (size_t)row_bytes);
            hit[a] = 1;
        }
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the rows before the flags */
        for (long long i = 0; i < n; i++) {
            long long a = index[se[i]];
            long long cell = ((long long)mb[i] * bs + tk[i]) * slots + of[i];
            __atomic_store_n(&info[a][cell], 1, __ATOMIC_RELAXED);
        }
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(bad);
}

/* How many rows ahead gather_batch asks for a window row before it copies it. */
#define GATHER_AHEAD_ROWS 4

/* Row copy of gather_batch: memcpy(dst, src, n), after a hint for the row it copies
 * GATHER_AHEAD_ROWS later (`ahead`, `ahead_bytes` long; NULL: none): a prefetch of one
 * cache line in each 4 KiB page of it. The rows sit scattered in the window and the
 * hardware prefetcher starts afresh at every page, so without the hint each page of each
 * row begins with a full memory latency. Prefetching whole rows, or non-temporal stores
 * (the output is reused while still in cache), measured slower. A prefetch never faults
 * and writes nothing: the output is the same bytes either way. */
static inline void gather_row(char *restrict dst, const char *restrict src, size_t n,
                              const char *ahead, size_t ahead_bytes) {
#if defined(__GNUC__) || defined(__clang__)
    if (ahead != NULL) {
        uintptr_t first = (uintptr_t)ahead, end = first + ahead_bytes;
        __builtin_prefetch(ahead, 0, 3);
        for (uintptr_t page = (first + 4096) & ~(uintptr_t)4095; page < end; page += 4096)
            __builtin_prefetch((const void *)page, 0, 3);
    }
#else
    (void)ahead;
    (void)ahead_bytes;
#endif
    memcpy(dst, src, n);
}

/* gather_batch(info, sessions_num, width, slots_offset, bs, slots, micro_batch,
 *              micro_batch_num, expert_num, empty_threshold, data, token_size, value_bytes,
 *              y, out_sessions, out_micro_batches, out_tokens, out_slots, window_rows,
 *              group_list, scales) -> number of rows n, or -1 - i for the first slot i (in
 * (session, token, slot) order) whose local expert id is in [expert_num, threshold) or < 0.
 *
 * npu_ffn_worker_batching's gather for need_schedule=1: the slots of every session's info
 * row (int32 [sessions_num, width], ids at slots_offset) whose id is below the empty
 * threshold, stably sorted by local expert id (a counting sort); row k of y gets the first
 * value_bytes of window slot ((session * M + micro_batch) * bs + token) * slots + slot
 * (data + that * token_size); the outputs (int32) get each row's session, micro-batch,
 * token and slot, window_rows (int64) its window slot; group_list (int64 [expert_num, 2],
 * zeroed by the caller) the experts present, in order, and their row counts; scales (if
 * not 0, float32 per row) the 4 bytes after each slot's values (an int8 row's scale). Checks every id
 * before it writes anything. */
static PyObject *gather_batch(PyObject *self, PyObject *args) {
    unsigned long long info, data, y, o_se, o_mb, o_tk, o_sl, o_rows, group_list, scales;
    long long sessions_num, width, slots_offset, bs, slots, micro_batch, micro_batch_num;
    long long expert_num, threshold, token_size, value_bytes;
    if (!PyArg_ParseTuple(args, "KLLLLLLLLLKLLKKKKKKKK", &info, &sessions_num, &width,
                          &slots_offset, &bs, &slots, &micro_batch, &micro_batch_num,
                          &expert_num, &threshold, &data, &token_size, &value_bytes, &y, &o_se,
                          &o_mb, &o_tk, &o_sl, &o_rows, &group_list, &scales))
        return NULL;
    const int32_t *rows = (const int32_t *)(uintptr_t)info;
    long long per_session = bs * slots, total = sessions_num * per_session;
    long long *start = (long long *)calloc((size_t)expert_num + 1, sizeof(long long));
    /* the ids, read from the window once: a peer may write it while this runs */
    int32_t *own = (int32_t *)malloc((size_t)(total > 0 ? total : 1) * sizeof(int32_t));
    /* the slots with an id, in slot order: the place loop looks GATHER_AHEAD_ROWS ahead */
    long long *picked = (long long *)malloc((size_t)(total > 0 ? total : 1) * sizeof(long long));
    if (start == NULL || own == NULL || picked == NULL) {
        free(start);
        free(own);
        free(picked);
        return PyErr_NoMemory();
    }
    long long result = 0;
    Py_BEGIN_ALLOW_THREADS
    for (long long s = 0; s < sessions_num; s++)
        memcpy(own + s * per_session, rows + s * width + slots_offset,
               (size_t)per_session * sizeof(int32_t));
    long long n = 0;
    for (long long i = 0; i < total; i++) { /* check and count */
        int32_t id = own[i];
        if (id >= threshold) continue;
        if (id < 0 || id >= expert_num) { result = -1 - i; break; }
        start[id + 1]++;
        picked[n++] = i;
    }
    if (result == 0) {
        int64_t *groups = (int64_t *)(uintptr_t)group_list;
        long long present = 0;
        for (long long e = 0; e < expert_num; e++) {
            if (start[e + 1]) {
                groups[2 * present] = e;
                groups[2 * present + 1] = start[e + 1];
                present++;
            }
            start[e + 1] += start[e];
        }
        size_t row_bytes = (size_t)value_bytes + (scales ? 4 : 0); /* what a row's copy reads */
        for (long long j = 0; j < n; j++) { /* place, in slot order within an expert */
            long long i = picked[j];
            long long s = i / per_session, within = i % per_session;
            int32_t id = own[i];
            long long k = start[id]++;
            long long token = within / slots, slot = within % slots;
            long long window_row = ((s * micro_batch_num + micro_batch) * bs + token) * slots + slot;
            const char *slot_bytes = (const char *)(uintptr_t)data + window_row * token_size;
            const char *ahead = NULL;
            if (j + GATHER_AHEAD_ROWS < n) { /* the same window row formula, for that slot */
                long long a = picked[j + GATHER_AHEAD_ROWS];
                long long a_row = ((a / per_session) * micro_batch_num + micro_batch) * per_session
                                  + a % per_session;
                ahead = (const char *)(uintptr_t)data + a_row * token_size;
            }
            gather_row((char *)(uintptr_t)y + k * value_bytes, slot_bytes, (size_t)value_bytes,
                       ahead, row_bytes);
            if (scales) /* int8 rows: the float32 scale right after the values */
                memcpy((char *)(uintptr_t)scales + 4 * k, slot_bytes + value_bytes, 4);
            ((int32_t *)(uintptr_t)o_se)[k] = (int32_t)s;
            ((int32_t *)(uintptr_t)o_mb)[k] = (int32_t)micro_batch;
            ((int32_t *)(uintptr_t)o_tk)[k] = (int32_t)token;
            ((int32_t *)(uintptr_t)o_sl)[k] = (int32_t)slot;
            ((int64_t *)(uintptr_t)o_rows)[k] = window_row;
        }
        result = start[expert_num];
    }
    Py_END_ALLOW_THREADS
    free(start);
    free(own);
    free(picked);
    return PyLong_FromLongLong(result);
}

static PyMethodDef methods[] = {
    {"f2a_scatter", f2a_scatter, METH_VARARGS, "npu_ffn_to_attention's row and flag writes."},
    {"gather_batch", gather_batch, METH_VARARGS, "npu_ffn_worker_batching's sort and gather."},
    {"a2f_scatter", a2f_scatter, METH_VARARGS, "npu_attention_to_ffn's row and id writes."},
    {"move_rows", move_rows, METH_VARARGS, "Move whole rows by index (see the C source)."},
    {"weighted_sum", weighted_sum, METH_VARARGS, "The combine's weighted sum."},
    {"quantize_rows", quantize_rows, METH_VARARGS, "Per-row dynamic int8 quantization."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

/* Bumped with every change of a function's arguments: rows.py uses this module only when
 * the numbers agree (an editable install keeps a stale build until it is rebuilt). */
#define NATIVE_ABI 3

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "ABI", NATIVE_ABI) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
