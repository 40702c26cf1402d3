/* The element walk of relaypacsd.dicomfile, over a file held whole in memory, in C.
 *
 * Why: the walk visits every element header of every file (about 260 in a small CT) and cost 120 us of
 * interpreter work per file, the largest single share of the daemon's CPU (issue #15). This is the same walk,
 * step for step, as dicomfile._walk with a whole-file reader: the same checks in the same order, the same
 * positions. It reports what went wrong as a status and dicomfile words the message, so every message is said
 * once. dicomfile falls back to its Python walk when this module is not built, and for files read in windows
 * (over 1 MiB); tests/test_elementwalk.py holds the two to the same answers.
 *
 * walk(buf, start, explicit, little, wanted, long_vrs) -> (status, pos, seen, values, tag, end)
 *   buf: the whole file; start: where the data set begins; wanted: {tag: most bytes read} of top-level values;
 *   long_vrs: the VRs with a 32-bit length in explicit VR, as concatenated 2-byte names.
 *   status 0: the data set ends at pos; seen: the set of top-level tags; values: {tag: (VR as written, bytes)}.
 *   status 1 (HEADER_CUT): the file ends inside an element header (or a wanted value) at pos.
 *   status 2 (DELIMITER): an unexpected delimiter `tag`; pos is after its header.
 *   status 3 (NEEDS): element `tag` needs `end` bytes.
 *   status 4 (ZERO_TAIL): tag (0000,0000) after the elements before it, at pos: zeros where data should be.
 *   status 5 (TOO_DEEP): sequences nested deeper than this walk goes: the Python walk judges the file.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

enum { WALK_OK = 0, WALK_HEADER_CUT = 1, WALK_DELIMITER = 2, WALK_NEEDS = 3, WALK_ZERO_TAIL = 4, WALK_TOO_DEEP = 5 };

#define UNDEFINED 0xFFFFFFFFu
#define ITEM 0xFFFEE000u
#define ITEM_END 0xFFFEE00Du
#define SEQ_END 0xFFFEE0DDu
#define NO_DELIMITER 0u /* the top level: the walk ends at the end of the file */
#define MAX_DEPTH 64    /* deeper nesting is left to the Python walk (and its recursion limit) */

typedef struct {
    const unsigned char *buf;
    Py_ssize_t size;
    unsigned char long_vr[26][26]; /* [first letter][second letter]: 1 for a VR with a 32-bit length */
    uint32_t *wanted_tags;
    Py_ssize_t *wanted_caps;
    Py_ssize_t n_wanted;
    PyObject *seen;   /* set of top-level tags */
    PyObject *values; /* {tag: (VR, value)} */
    uint32_t max_seen;
    int any_seen;
    int status;
    Py_ssize_t err_pos, err_end;
    uint32_t err_tag;
} Walk;

#define PY_ERROR (-2) /* a Python exception is set (out of memory) */
#define WALK_FAILED (-1)

static inline uint16_t u16(const unsigned char *p, int little) {
    return little ? (uint16_t)(p[0] | (p[1] << 8)) : (uint16_t)((p[0] << 8) | p[1]);
}

static inline uint32_t u32(const unsigned char *p, int little) {
    return little ? ((uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24))
                  : (((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3]);
}

static Py_ssize_t fail(Walk *w, int status, Py_ssize_t pos, uint32_t tag, Py_ssize_t end) {
    w->status = status;
    w->err_pos = pos;
    w->err_tag = tag;
    w->err_end = end;
    return WALK_FAILED;
}

static int keep_value(Walk *w, uint32_t tag, const char vr[2], Py_ssize_t pos, uint32_t length) {
    PyObject *key = PyLong_FromUnsignedLong(tag);
    PyObject *pair = key ? Py_BuildValue("(y#y#)", vr, (Py_ssize_t)2, (const char *)w->buf + pos,
                                         (Py_ssize_t)length) : NULL;
    int rc = pair ? PyDict_SetItem(w->values, key, pair) : -1;
    Py_XDECREF(key);
    Py_XDECREF(pair);
    return rc;
}

/* Walk elements from pos; stop at the end of the file (top level) or after the delimiter `until`.
 * Returns the end offset, WALK_FAILED with w->status set, or PY_ERROR. */
static Py_ssize_t walk(Walk *w, Py_ssize_t pos, int explicit, int little, uint32_t until, int depth) {
    const Py_ssize_t size = w->size;
    const int top = until == NO_DELIMITER;
    if (depth > MAX_DEPTH)
        return fail(w, WALK_TOO_DEEP, pos, 0, 0);
    for (;;) {
        if (pos == size && top)
            return pos;
        if (pos + 8 > size)
            return fail(w, WALK_HEADER_CUT, pos, 0, 0);
        const unsigned char *p = w->buf + pos;
        const uint16_t group = u16(p, little), element = u16(p + 2, little);
        const uint32_t tag = ((uint32_t)group << 16) | element;
        uint32_t length;
        char vr[2] = {'?', '?'};
        if (explicit) {
            vr[0] = (char)p[4];
            vr[1] = (char)p[5];
            length = u16(p + 6, little);
        } else {
            length = u32(p + 4, little);
        }
        if (group == 0xFFFE) { /* item and delimiter tags are always implicit: 4-byte length */
            length = u32(p + 4, little);
            pos += 8;
            if (tag == until)
                return pos;
            if (tag == ITEM) {
                if (length == UNDEFINED) {
                    pos = walk(w, pos, explicit, little, ITEM_END, depth + 1);
                    if (pos < 0)
                        return pos;
                } else {
                    Py_ssize_t end = pos + (Py_ssize_t)length;
                    if (end > size)
                        return fail(w, WALK_NEEDS, pos, tag, end);
                    pos = end;
                }
                continue;
            }
            return fail(w, WALK_DELIMITER, pos, tag, 0);
        }
        if (top) {
            /* A preallocated file not yet filled reads on as zeros: tag (0000,0000) after the elements before it. */
            if (group == 0 && w->any_seen && w->max_seen >= tag)
                return fail(w, WALK_ZERO_TAIL, pos, tag, 0);
            PyObject *key = PyLong_FromUnsignedLong(tag);
            if (key == NULL || PySet_Add(w->seen, key) < 0) {
                Py_XDECREF(key);
                return PY_ERROR;
            }
            Py_DECREF(key);
            if (!w->any_seen || tag > w->max_seen)
                w->max_seen = tag;
            w->any_seen = 1;
        }
        const int letters = explicit && vr[0] >= 'A' && vr[0] <= 'Z' && vr[1] >= 'A' && vr[1] <= 'Z';
        const int is_long = letters && w->long_vr[vr[0] - 'A'][vr[1] - 'A'];
        if (letters && !is_long) { /* a VR with a 16-bit length */
            pos += 8;
        } else if (is_long) {
            if (pos + 12 > size)
                return fail(w, WALK_HEADER_CUT, pos, 0, 0);
            length = u32(p + 8, little);
            pos += 12;
        } else { /* implicit VR, or an explicit file's element that carries none (read as implicit) */
            if (explicit)
                length = u32(p + 4, little);
            if (length == UNDEFINED) {
                vr[0] = 'S';
                vr[1] = 'Q';
            } else {
                vr[0] = vr[1] = '?';
            }
            pos += 8;
        }
        if (length == UNDEFINED) {
            /* an undefined-length UN holds an implicit little-endian sequence */
            const int un = vr[0] == 'U' && vr[1] == 'N';
            pos = walk(w, pos, explicit && !un, little || un, SEQ_END, depth + 1);
            if (pos < 0)
                return pos;
            continue;
        }
        if (top) {
            for (Py_ssize_t i = 0; i < w->n_wanted; i++) {
                if (w->wanted_tags[i] == tag) {
                    if ((Py_ssize_t)length <= w->wanted_caps[i]) {
                        if (pos + (Py_ssize_t)length > size)
                            return fail(w, WALK_HEADER_CUT, pos, 0, 0);
                        if (keep_value(w, tag, vr, pos, length) < 0)
                            return PY_ERROR;
                    }
                    break;
                }
            }
        }
        Py_ssize_t end = pos + (Py_ssize_t)length;
        if (end > size)
            return fail(w, WALK_NEEDS, pos, tag, end);
        pos = end;
    }
}

static int read_wanted(Walk *w, PyObject *wanted) {
    Py_ssize_t n = PyDict_Size(wanted), i = 0, at = 0;
    PyObject *key, *value;
    if (n < 0)
        return -1;
    w->wanted_tags = PyMem_Malloc(sizeof(uint32_t) * (size_t)(n ? n : 1));
    w->wanted_caps = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n ? n : 1));
    if (w->wanted_tags == NULL || w->wanted_caps == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    while (PyDict_Next(wanted, &i, &key, &value)) {
        unsigned long tag = PyLong_AsUnsignedLong(key);
        Py_ssize_t cap = PyLong_AsSsize_t(value);
        if (PyErr_Occurred())
            return -1;
        w->wanted_tags[at] = (uint32_t)tag;
        w->wanted_caps[at] = cap;
        at++;
    }
    w->n_wanted = at;
    return 0;
}

static PyObject *py_walk(PyObject *self, PyObject *args) {
    Py_buffer buf, long_vrs;
    Py_ssize_t start;
    int explicit, little;
    PyObject *wanted, *result = NULL;
    Walk w;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nppO!y*", &buf, &start, &explicit, &little, &PyDict_Type, &wanted, &long_vrs))
        return NULL;
    memset(&w, 0, sizeof w);
    w.buf = buf.buf;
    w.size = buf.len;
    const unsigned char *names = long_vrs.buf;
    for (Py_ssize_t i = 0; i + 1 < long_vrs.len; i += 2) {
        if (names[i] >= 'A' && names[i] <= 'Z' && names[i + 1] >= 'A' && names[i + 1] <= 'Z')
            w.long_vr[names[i] - 'A'][names[i + 1] - 'A'] = 1;
    }
    w.seen = PySet_New(NULL);
    w.values = PyDict_New();
    if (w.seen == NULL || w.values == NULL || read_wanted(&w, wanted) < 0)
        goto done;
    if (start < 0 || start > w.size) {
        PyErr_SetString(PyExc_ValueError, "start is outside the buffer");
        goto done;
    }
    Py_ssize_t pos = walk(&w, start, explicit, little, NO_DELIMITER, 0);
    if (pos == PY_ERROR)
        goto done;
    if (pos >= 0)
        result = Py_BuildValue("(inOOkn)", WALK_OK, pos, w.seen, w.values, 0UL, (Py_ssize_t)0);
    else
        result = Py_BuildValue("(inOOkn)", w.status, w.err_pos, w.seen, w.values, (unsigned long)w.err_tag,
                               w.err_end);
done:
    Py_XDECREF(w.seen);
    Py_XDECREF(w.values);
    PyMem_Free(w.wanted_tags);
    PyMem_Free(w.wanted_caps);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&long_vrs);
    return result;
}

static PyMethodDef methods[] = {
    {"walk", py_walk, METH_VARARGS, "Walk a DICOM data set held whole in memory (see relaypacsd.dicomfile)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_elementwalk", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__elementwalk(void) { return PyModule_Create(&module); }
