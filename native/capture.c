/*
 * guardrail native capture: a graph-evaluation callback for llama.cpp.
 *
 * llama.cpp's scheduler asks the callback about every node of every graph it
 * computes (about a thousand per batch), so the callback must be native. It
 * answers "yes" only for the residual-stream outputs of the layers asked for
 * ("l_out-<i>") and the final normed output ("result_norm"), and copies the
 * rows of each accepted tensor into caller-owned float32 buffers.
 *
 * Version-proofing: this file includes no llama.cpp or ggml header and links
 * neither. The few ggml functions it calls are handed in as addresses taken
 * from the libraries llama-cpp-python already loaded, so it cannot disagree
 * with the running ggml about struct layouts; a tensor is only ever an opaque
 * pointer passed back to ggml.
 *
 * Safety: every copy is bounds-checked against the caller's buffer; anything
 * unexpected (not f32, not contiguous, wrong width, too many rows) is skipped
 * with an error recorded in the slot, never written out of bounds.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GR_ABI_VERSION 1
#define GR_MAX_SLOTS 64
#define GR_MAX_LAYERS 4096
#define GR_RESULT_NORM (-1)

enum gr_error {
    GR_OK = 0,
    GR_ERR_NOT_F32 = 1,        /* element size is not 4 bytes or bytes != elements * 4 */
    GR_ERR_NOT_CONTIGUOUS = 2, /* ggml_backend_tensor_get needs one contiguous block */
    GR_ERR_WIDTH = 3,          /* row width differs from the buffer's row width */
    GR_ERR_OVERFLOW = 4,       /* the rows would not fit the buffer: skipped */
    GR_ERR_NO_API = 5,         /* ggml function addresses were not provided */
};

typedef const char *(*fn_get_name)(const void *);
typedef int64_t (*fn_int64_of)(const void *);
typedef size_t (*fn_size_of)(const void *);
typedef bool (*fn_bool_of)(const void *);
typedef void (*fn_tensor_get)(const void *, void *, size_t, size_t);

typedef struct {
    int32_t layer;          /* layer index, or GR_RESULT_NORM */
    float *buf;             /* caller-owned, capacity_rows * n_embd floats */
    int64_t capacity_rows;
    int64_t n_rows;         /* rows written since the last reset */
    int64_t n_tensors;      /* tensors accepted since the last reset (one per micro-batch) */
    int64_t dropped_rows;   /* rows skipped because of an error */
    int32_t error;          /* first error since the last reset */
} gr_slot;

typedef struct {
    uint32_t abi;
    fn_get_name get_name;
    fn_int64_of nelements;
    fn_int64_of nrows;
    fn_size_of nbytes;
    fn_size_of element_size;
    fn_bool_of is_contiguous;
    fn_tensor_get tensor_get;
    int64_t n_embd;
    int32_t enabled;
    int32_t n_slots;
    gr_slot slots[GR_MAX_SLOTS];
    int16_t slot_of_layer[GR_MAX_LAYERS];
    int16_t slot_of_result_norm;
    int64_t n_layer_tensors_seen; /* any "l_out-<i>" seen, wanted or not: tells us the model names its layers */
} gr_capture;

int gr_abi_version(void) { return GR_ABI_VERSION; }

void *gr_capture_new(int64_t n_embd) {
    if (n_embd <= 0) return NULL;
    gr_capture *cap = (gr_capture *)calloc(1, sizeof(gr_capture));
    if (!cap) return NULL;
    cap->abi = GR_ABI_VERSION;
    cap->n_embd = n_embd;
    cap->enabled = 1;
    for (int i = 0; i < GR_MAX_LAYERS; i++) cap->slot_of_layer[i] = -1;
    cap->slot_of_result_norm = -1;
    return cap;
}

void gr_capture_free(void *handle) { free(handle); }

int gr_capture_set_api(void *handle, void *get_name, void *nelements, void *nrows, void *nbytes,
                       void *element_size, void *is_contiguous, void *tensor_get) {
    gr_capture *cap = (gr_capture *)handle;
    if (!cap || !get_name || !nelements || !nrows || !nbytes || !element_size || !is_contiguous ||
        !tensor_get)
        return -1;
    cap->get_name = (fn_get_name)get_name;
    cap->nelements = (fn_int64_of)nelements;
    cap->nrows = (fn_int64_of)nrows;
    cap->nbytes = (fn_size_of)nbytes;
    cap->element_size = (fn_size_of)element_size;
    cap->is_contiguous = (fn_bool_of)is_contiguous;
    cap->tensor_get = (fn_tensor_get)tensor_get;
    return 0;
}

/* Register a buffer for one layer (or GR_RESULT_NORM). Returns the slot index, or -1. */
int gr_capture_add_slot(void *handle, int32_t layer, float *buf, int64_t capacity_rows) {
    gr_capture *cap = (gr_capture *)handle;
    if (!cap || !buf || capacity_rows <= 0 || cap->n_slots >= GR_MAX_SLOTS) return -1;
    if (layer != GR_RESULT_NORM && (layer < 0 || layer >= GR_MAX_LAYERS)) return -1;
    if (layer == GR_RESULT_NORM ? cap->slot_of_result_norm >= 0 : cap->slot_of_layer[layer] >= 0)
        return -1;
    int idx = cap->n_slots++;
    gr_slot *slot = &cap->slots[idx];
    memset(slot, 0, sizeof(*slot));
    slot->layer = layer;
    slot->buf = buf;
    slot->capacity_rows = capacity_rows;
    if (layer == GR_RESULT_NORM)
        cap->slot_of_result_norm = (int16_t)idx;
    else
        cap->slot_of_layer[layer] = (int16_t)idx;
    return idx;
}

void gr_capture_reset(void *handle) {
    gr_capture *cap = (gr_capture *)handle;
    if (!cap) return;
    for (int i = 0; i < cap->n_slots; i++) {
        cap->slots[i].n_rows = 0;
        cap->slots[i].n_tensors = 0;
        cap->slots[i].dropped_rows = 0;
        cap->slots[i].error = GR_OK;
    }
    cap->n_layer_tensors_seen = 0;
}

void gr_capture_set_enabled(void *handle, int enabled) {
    gr_capture *cap = (gr_capture *)handle;
    if (cap) cap->enabled = enabled ? 1 : 0;
}

/* Read back one slot's counters: out[0]=rows, out[1]=tensors, out[2]=dropped, out[3]=error. */
int gr_capture_slot_info(void *handle, int slot_idx, int64_t *out) {
    gr_capture *cap = (gr_capture *)handle;
    if (!cap || !out || slot_idx < 0 || slot_idx >= cap->n_slots) return -1;
    const gr_slot *s = &cap->slots[slot_idx];
    out[0] = s->n_rows;
    out[1] = s->n_tensors;
    out[2] = s->dropped_rows;
    out[3] = s->error;
    return 0;
}

int64_t gr_capture_layer_tensors_seen(void *handle) {
    gr_capture *cap = (gr_capture *)handle;
    return cap ? cap->n_layer_tensors_seen : 0;
}

/* "l_out-<digits>" exactly -> layer; "result_norm" -> GR_RESULT_NORM; else -2. */
static int32_t parse_name(const char *name) {
    if (!name) return -2;
    if (name[0] == 'l' && strncmp(name, "l_out-", 6) == 0) {
        const char *p = name + 6;
        if (*p < '0' || *p > '9') return -2;
        int32_t value = 0;
        for (; *p >= '0' && *p <= '9'; p++) {
            value = value * 10 + (*p - '0');
            if (value >= GR_MAX_LAYERS) return -2;
        }
        return *p == '\0' ? value : -2;
    }
    /* With embeddings on and pooling "none", llama.cpp renames the same tensor
     * "result_embd_pooled"; guardrail's contexts always use pooling "none". */
    if (name[0] == 'r' && (strcmp(name, "result_norm") == 0 || strcmp(name, "result_embd_pooled") == 0))
        return GR_RESULT_NORM;
    return -2;
}

static gr_slot *slot_for(gr_capture *cap, int32_t layer) {
    int16_t idx = layer == GR_RESULT_NORM ? cap->slot_of_result_norm : cap->slot_of_layer[layer];
    return idx >= 0 ? &cap->slots[idx] : NULL;
}

static void record(gr_slot *slot, int error, int64_t rows) {
    if (slot->error == GR_OK) slot->error = error;
    slot->dropped_rows += rows > 0 ? rows : 0;
}

static void copy_rows(gr_capture *cap, gr_slot *slot, const void *t) {
    int64_t rows = cap->nrows(t);
    int64_t elems = cap->nelements(t);
    slot->n_tensors++;
    if (rows <= 0 || elems <= 0) return; /* a micro-batch with no output rows */
    if (cap->element_size(t) != sizeof(float) || cap->nbytes(t) != (size_t)elems * sizeof(float)) {
        record(slot, GR_ERR_NOT_F32, rows);
        return;
    }
    if (!cap->is_contiguous(t)) {
        record(slot, GR_ERR_NOT_CONTIGUOUS, rows);
        return;
    }
    if (elems % rows != 0 || elems / rows != cap->n_embd) {
        record(slot, GR_ERR_WIDTH, rows);
        return;
    }
    if (rows > slot->capacity_rows - slot->n_rows) {
        record(slot, GR_ERR_OVERFLOW, rows);
        return;
    }
    float *dst = slot->buf + slot->n_rows * cap->n_embd;
    cap->tensor_get(t, dst, 0, (size_t)elems * sizeof(float));
    slot->n_rows += rows;
}

/*
 * The callback llama.cpp calls (ggml_backend_sched_eval_callback):
 * ask=true: "do you want this tensor's data?"; ask=false: "here it is".
 * Returning false when ask=false would abort the graph, so we always go on.
 */
bool gr_eval_callback(void *tensor, bool ask, void *user_data) {
    gr_capture *cap = (gr_capture *)user_data;
    if (!cap || !cap->get_name) return ask ? false : true;
    int32_t layer = parse_name(cap->get_name(tensor));
    if (layer == -2) return ask ? false : true;
    if (ask) {
        if (layer >= 0) cap->n_layer_tensors_seen++;
        return cap->enabled && slot_for(cap, layer) != NULL;
    }
    gr_slot *slot = slot_for(cap, layer);
    if (slot && cap->enabled) copy_rows(cap, slot, tensor);
    return true;
}

/* A Python module shell so the library is built and installed as an ordinary
 * C extension; Python reaches the functions above through ctypes. */
static PyObject *py_abi_version(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyLong_FromLong(GR_ABI_VERSION);
}

static PyMethodDef methods[] = {
    {"abi_version", py_abi_version, METH_NOARGS, "ABI version of the native capture."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_capture", "guardrail native capture (use via ctypes).", -1, methods,
};

PyMODINIT_FUNC PyInit__capture(void) { return PyModule_Create(&module); }
