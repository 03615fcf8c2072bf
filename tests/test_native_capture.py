"""The native callback on its own, against fake ggml functions: what it accepts, what it copies,
and that nothing unexpected is ever written out of bounds."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from guardrail.runtime.capture import _load_native

N_EMBD = 4


class FakeTensor(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 64), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("esize", ctypes.c_int64), ("contiguous", ctypes.c_int32),
                ("data", ctypes.POINTER(ctypes.c_float))]


def _t(ptr: int) -> FakeTensor:
    return ctypes.cast(ptr, ctypes.POINTER(FakeTensor)).contents


GET_NAME = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(lambda p: p + FakeTensor.name.offset)
NELEMENTS = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)(lambda p: _t(p).rows * _t(p).cols)
NROWS = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)(lambda p: _t(p).rows)
NBYTES = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p)(lambda p: _t(p).rows * _t(p).cols * _t(p).esize)
ESIZE = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p)(lambda p: _t(p).esize)
CONTIG = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)(lambda p: bool(_t(p).contiguous))


@ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)
def TENSOR_GET(p, dst, offset, size):  # noqa: N802
    ctypes.memmove(dst, ctypes.addressof(_t(p).data.contents) + offset, size)


class Harness:
    """A capture handle wired to the fakes, with helpers to play llama.cpp's part."""

    def __init__(self):
        self.lib = _load_native()
        self.lib.gr_eval_callback.restype = ctypes.c_bool
        self.lib.gr_eval_callback.argtypes = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p]
        self.handle = ctypes.c_void_p(self.lib.gr_capture_new(N_EMBD))
        fns = [GET_NAME, NELEMENTS, NROWS, NBYTES, ESIZE, CONTIG, TENSOR_GET]
        assert self.lib.gr_capture_set_api(self.handle, *[ctypes.cast(f, ctypes.c_void_p) for f in fns]) == 0
        self.keep = []

    def slot(self, layer: int, buf: np.ndarray, capacity: int) -> int:
        return self.lib.gr_capture_add_slot(self.handle, layer, buf.ctypes.data, capacity)

    def tensor(self, name: str, rows: int, cols: int = N_EMBD, esize: int = 4, contiguous: bool = True,
               fill: float = 1.0) -> FakeTensor:
        data = np.full(rows * cols, fill, dtype=np.float32)
        t = FakeTensor(name.encode(), rows, cols, esize, int(contiguous),
                       data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        self.keep.append((t, data))
        return t

    def ask(self, t: FakeTensor) -> bool:
        return self.lib.gr_eval_callback(ctypes.addressof(t), True, self.handle)

    def observe(self, t: FakeTensor) -> bool:
        return self.lib.gr_eval_callback(ctypes.addressof(t), False, self.handle)

    def info(self, slot: int) -> tuple[int, int, int, int]:
        out = (ctypes.c_int64 * 4)()
        self.lib.gr_capture_slot_info(self.handle, slot, out)
        return tuple(out)


@pytest.fixture()
def h():
    harness = Harness()
    yield harness
    harness.lib.gr_capture_free(harness.handle)


def test_accepts_only_the_registered_layers_and_result_norm(h):
    buf = np.zeros((8, N_EMBD), np.float32)
    h.slot(3, buf, 8)
    h.slot(-1, np.zeros((8, N_EMBD), np.float32), 8)
    assert h.ask(h.tensor("l_out-3", 1))
    assert h.ask(h.tensor("result_norm", 1))
    assert h.ask(h.tensor("result_embd_pooled", 1))
    for other in ("l_out-4", "l_out-30", "l_out-3x", "l_out-", "l_out--3", "xl_out-3", "attn_out-3",
                  "l_out-3 (view)", "result_norm_x", ""):
        assert not h.ask(h.tensor(other, 1)), other


def test_rows_of_micro_batches_are_appended_in_order(h):
    buf = np.zeros((8, N_EMBD), np.float32)
    slot = h.slot(3, buf, 8)
    assert h.observe(h.tensor("l_out-3", 2, fill=1.0))
    assert h.observe(h.tensor("l_out-3", 0))  # a micro-batch with no rows
    assert h.observe(h.tensor("l_out-3", 3, fill=2.0))
    assert h.info(slot) == (5, 3, 0, 0)
    assert np.all(buf[:2] == 1.0) and np.all(buf[2:5] == 2.0) and np.all(buf[5:] == 0.0)
    h.lib.gr_capture_reset(h.handle)
    assert h.info(slot) == (0, 0, 0, 0)


def test_too_many_rows_are_skipped_never_written_past_the_buffer(h):
    backing = np.full((10, N_EMBD), -7.0, np.float32)  # the capture may use only 4 rows of it
    slot = h.slot(3, backing, 4)
    assert h.observe(h.tensor("l_out-3", 3, fill=1.0))
    assert h.observe(h.tensor("l_out-3", 2, fill=2.0))  # 3 + 2 > 4: skipped, recorded
    rows, tensors, dropped, error = h.info(slot)
    assert (rows, tensors, dropped, error) == (3, 2, 2, 4)
    assert np.all(backing[:3] == 1.0) and np.all(backing[3:] == -7.0)


@pytest.mark.parametrize("kwargs, code", [
    ({"esize": 2}, 1),            # f16: not what the buffers hold
    ({"contiguous": False}, 2),   # a strided view cannot be read in one block
    ({"cols": N_EMBD + 1}, 3),    # a row width other than n_embd
])
def test_unexpected_tensors_are_skipped_with_a_recorded_error(h, kwargs, code):
    backing = np.full((4, N_EMBD), -7.0, np.float32)
    slot = h.slot(3, backing, 4)
    assert h.observe(h.tensor("l_out-3", 2, **kwargs))
    assert h.info(slot)[3] == code
    assert np.all(backing == -7.0)


def test_a_disabled_capture_accepts_nothing(h):
    h.slot(3, np.zeros((4, N_EMBD), np.float32), 4)
    h.lib.gr_capture_set_enabled(h.handle, 0)
    assert not h.ask(h.tensor("l_out-3", 1))
    h.lib.gr_capture_set_enabled(h.handle, 1)
    assert h.ask(h.tensor("l_out-3", 1))


def test_invalid_slots_are_refused(h):
    buf = np.zeros((4, N_EMBD), np.float32)
    assert h.slot(5000, buf, 4) == -1   # beyond any layer index we track
    assert h.slot(-2, buf, 4) == -1
    assert h.slot(3, buf, 0) == -1
    assert h.slot(3, buf, 4) == 0
    assert h.slot(3, buf, 4) == -1      # the same layer twice


def test_a_capture_without_ggml_functions_never_accepts():
    lib = _load_native()
    lib.gr_eval_callback.restype = ctypes.c_bool
    lib.gr_eval_callback.argtypes = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p]
    handle = ctypes.c_void_p(lib.gr_capture_new(N_EMBD))
    try:
        assert not lib.gr_eval_callback(None, True, handle)
        assert lib.gr_eval_callback(None, False, handle)  # and never aborts the graph
        assert lib.gr_capture_new(0) is None
    finally:
        lib.gr_capture_free(handle)
