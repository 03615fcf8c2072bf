"""Hidden states of chosen layers, captured natively inside llama.cpp's graph evaluation.

Hook points keep llama.cpp's own tensor names: ``l_out-<i>`` is the residual
stream after layer ``i``; ``result_norm`` is the final normed state (what
``llama_get_embeddings_ith`` returns). The native callback (``native/capture.c``)
copies the rows of every micro-batch into float32 buffers this module owns; a
decode's states are then numpy *views* of those buffers, valid until the next
decode (copy what you keep).

Which tokens a capture holds: llama.cpp drops the rows not marked for output
before the last layer, so ``l_out-<n_layer-1>`` and ``result_norm`` hold only
the output tokens of the batch, every other layer holds every token. Both are in
batch order (guardrail uses a unified KV cache, so micro-batches never reorder).
:class:`BatchStates` answers "which row is token j" for either kind.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp  # noqa: F401  (load llama.cpp before numpy: see README, import order)
import llama_cpp.llama_cpp as llama_low
import numpy as np

from guardrail.errors import CaptureError

RESULT_NORM = "result_norm"
_NATIVE_ABI = 1
_RESULT_NORM_LAYER = -1
_GGML_FUNCTIONS = ("ggml_get_name", "ggml_nelements", "ggml_nrows", "ggml_nbytes",
                   "ggml_element_size", "ggml_is_contiguous", "ggml_backend_tensor_get")
_ERRORS = {1: "tensor is not float32", 2: "tensor is not contiguous",
           3: "row width differs from the model's embedding width",
           4: "more rows than the capture buffer holds", 5: "ggml functions not set"}


def layer_name(layer: int) -> str:
    """The stable name of the residual stream after ``layer`` (llama.cpp's own)."""
    return f"l_out-{layer}"


def parse_hook_name(name: str, n_layer: int) -> int:
    """Layer index of a hook name (``-1`` for result_norm); raises on an unknown name."""
    if name == RESULT_NORM:
        return _RESULT_NORM_LAYER
    prefix = "l_out-"
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        layer = int(name[len(prefix):])
        if layer < n_layer:
            return layer
        raise CaptureError(f"hook {name!r}: this model has layers 0..{n_layer - 1}")
    raise CaptureError(f"unknown hook {name!r}: use 'l_out-<layer>' or 'result_norm'")


def _load_native() -> ctypes.CDLL:
    try:
        from . import _capture
    except ImportError as exc:  # the extension was not built
        raise CaptureError(f"guardrail's native capture is not built ({exc}); reinstall guardrail") from None
    lib = ctypes.CDLL(_capture.__file__)
    lib.gr_abi_version.restype = ctypes.c_int
    if lib.gr_abi_version() != _NATIVE_ABI:
        raise CaptureError("guardrail's native capture is from another version; reinstall guardrail")
    lib.gr_capture_new.restype = ctypes.c_void_p
    lib.gr_capture_new.argtypes = [ctypes.c_int64]
    lib.gr_capture_free.argtypes = [ctypes.c_void_p]
    lib.gr_capture_set_api.restype = ctypes.c_int
    lib.gr_capture_set_api.argtypes = [ctypes.c_void_p] * 8
    lib.gr_capture_add_slot.restype = ctypes.c_int
    lib.gr_capture_add_slot.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64]
    lib.gr_capture_reset.argtypes = [ctypes.c_void_p]
    lib.gr_capture_set_enabled.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.gr_capture_slot_info.restype = ctypes.c_int
    lib.gr_capture_slot_info.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    lib.gr_capture_layer_tensors_seen.restype = ctypes.c_int64
    lib.gr_capture_layer_tensors_seen.argtypes = [ctypes.c_void_p]
    return lib


def _ggml_addresses() -> list[int]:
    """Addresses of the ggml functions the callback calls, from the ggml llama.cpp runs with.

    dlsym on libllama's handle also searches the libraries it depends on, so
    these are exactly the functions of the loaded ggml, whatever its version.
    """
    addresses: list[int] = []
    for symbol in _GGML_FUNCTIONS:
        try:
            addresses.append(_address(getattr(llama_low._lib, symbol)))
        except AttributeError:
            raise CaptureError(
                f"the loaded llama.cpp does not export {symbol}; this llama-cpp-python build "
                "is not supported by the native capture") from None
    return addresses


def _address(function: Any) -> int:
    """A C function's address (a NULL one is a build that cannot serve the capture)."""
    address = ctypes.cast(function, ctypes.c_void_p).value
    if not address:
        raise CaptureError("a function the native capture needs has no address in the loaded libraries")
    return address


def check_bindings() -> None:
    """Fail clearly when llama-cpp-python's context params lack the eval callback fields."""
    fields = {name for name, *_ in llama_low.llama_context_params._fields_}
    missing = {"cb_eval", "cb_eval_user_data", "kv_unified"} - fields
    if missing:
        raise CaptureError(
            f"llama-cpp-python {llama_cpp.__version__} lacks context fields {sorted(missing)}; "
            "guardrail needs llama-cpp-python >=0.3.15")


@dataclass(frozen=True)
class BatchStates:
    """The states one decode captured, and which batch tokens their rows are.

    ``rows[name]`` is an (n_rows, n_embd) float32 view; ``token_index[name][r]``
    is the batch index of row ``r``.
    """

    rows: dict[str, np.ndarray]
    token_index: dict[str, np.ndarray]

    def of(self, name: str, batch_index: int) -> np.ndarray:
        """State of one batch token at a hook; KeyError if that token has no row there."""
        where = np.flatnonzero(self.token_index[name] == batch_index)
        if where.size == 0:
            raise KeyError(f"{name} holds no row for batch token {batch_index}")
        return np.asarray(self.rows[name][where[0]])


class NativeCapture:
    """Owns the native capture state and its float32 buffers; plugs into ``cb_eval``."""

    def __init__(self, names: Sequence[str], *, n_embd: int, n_layer: int, capacity_rows: int):
        check_bindings()
        if not names:
            raise CaptureError("nothing to capture: name at least one hook")
        self.names = tuple(dict.fromkeys(names))
        self.n_embd = n_embd
        self.n_layer = n_layer
        self._layers = [parse_hook_name(n, n_layer) for n in self.names]
        self._lib = _load_native()
        handle = self._lib.gr_capture_new(n_embd)
        if not handle:
            raise CaptureError("could not allocate the native capture")
        self._handle = ctypes.c_void_p(handle)
        if self._lib.gr_capture_set_api(self._handle, *_ggml_addresses()) != 0:
            raise CaptureError("could not hand the ggml functions to the native capture")
        self._buffers = [np.zeros((capacity_rows, n_embd), dtype=np.float32) for _ in self.names]
        for layer, buf in zip(self._layers, self._buffers):
            slot = self._lib.gr_capture_add_slot(self._handle, layer, buf.ctypes.data, capacity_rows)
            if slot < 0:
                raise CaptureError(f"could not register a buffer for layer {layer}")
        self._info = (ctypes.c_int64 * 4)()
        self.callback = ctypes.cast(_address(self._lib.gr_eval_callback), llama_low.ggml_backend_sched_eval_callback)

    @property
    def user_data(self) -> ctypes.c_void_p:
        return self._handle

    def reset(self) -> None:
        self._lib.gr_capture_reset(self._handle)

    def set_enabled(self, enabled: bool) -> None:
        """Disabled, the callback accepts nothing, so the scheduler runs the graph unsplit."""
        self._lib.gr_capture_set_enabled(self._handle, int(enabled))

    def _slot(self, i: int) -> tuple[int, int, int, int]:
        self._lib.gr_capture_slot_info(self._handle, i, self._info)
        rows, tensors, dropped, error = (int(v) for v in self._info)
        return rows, tensors, dropped, error

    def collect(self, n_tokens: int, output_index: np.ndarray) -> BatchStates:
        """States of the decode just run: ``n_tokens`` in the batch, ``output_index`` those marked for output."""
        rows: dict[str, np.ndarray] = {}
        token_index: dict[str, np.ndarray] = {}
        all_tokens = np.arange(n_tokens)
        for i, name in enumerate(self.names):
            n_rows, n_tensors, dropped, error = self._slot(i)
            if error:
                raise CaptureError(f"capture of {name} failed: {_ERRORS.get(error, error)} "
                                   f"({dropped} rows dropped)")
            if n_tensors == 0 and n_tokens > 0:
                if self._lib.gr_capture_layer_tensors_seen(self._handle) == 0:
                    raise CaptureError(
                        "this model's graph has no tensors named 'l_out-<layer>'; its architecture "
                        "is not supported by the capture")
                raise CaptureError(f"the model's graph produced no tensor named {name}")
            if n_rows == n_tokens:
                token_index[name] = all_tokens
            elif n_rows == len(output_index):
                token_index[name] = output_index
            else:
                raise CaptureError(f"{name}: captured {n_rows} rows for a batch of {n_tokens} "
                                   f"tokens with {len(output_index)} outputs")
            rows[name] = self._buffers[i][:n_rows]
        return BatchStates(rows, token_index)

    def close(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.gr_capture_free(self._handle)
            self._handle = ctypes.c_void_p()  # NULL: closed

    def __del__(self) -> None:
        self.close()
