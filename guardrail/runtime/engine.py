"""The model and its context, on llama-cpp-python's low-level API.

We need what the high-level ``Llama`` class hides: the graph-evaluation
callback (for the capture), several KV-cache sequences sharing cells (for the
[CLS] probe), ``llama_memory_seq_cp/seq_rm`` and batches that mix sequences.
Each class owns one llama.cpp handle and frees it (``_internals.py`` style).

Text a user or the model wrote is always tokenized with special-token parsing
off: only the chat template's own markers become control tokens, so typing
``<|im_end|>`` gets plain text.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp  # load llama.cpp before numpy (see README, import order)
import llama_cpp.llama_cpp as llama_low
import numpy as np

from guardrail.artifacts.models import KNOWN_MODELS
from guardrail.artifacts.stores import ollama_label
from guardrail.errors import ContextError, ContextOverflowError, ModelError

from .capture import BatchStates, NativeCapture

GGUF_MAGIC = b"GGUF"

# ---------------------------------------------------------------------------
# llama.cpp's log: kept (for error messages), printed only when asked.

_log_lock = threading.Lock()
_log_tail: deque[str] = deque(maxlen=40)
_log_verbose = bool(os.environ.get("GUARDRAIL_VERBOSE"))
_backend_ready = False


def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace")
    with _log_lock:
        _log_tail.append(message)
    if _log_verbose:
        print(message, end="", file=__import__("sys").stderr, flush=True)


_log_callback = llama_low.llama_log_callback(_log)  # kept alive here: llama.cpp holds the pointer


def set_verbose(verbose: bool) -> None:
    """Print llama.cpp's own log to stderr (off by default: we report errors ourselves)."""
    global _log_verbose
    _log_verbose = verbose


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_low.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_low.llama_backend_init()
        _backend_ready = True


def _last_llama_error() -> str:
    """The most telling recent line of llama.cpp's log, for an error message."""
    with _log_lock:
        lines = [line.strip() for line in _log_tail if line.strip()]
    for keyword in ("error", "failed", "invalid", "not within", "corrupt"):
        for line in reversed(lines):
            if keyword in line.lower():
                return line
    return lines[-1] if lines else "no details"


def check_gguf(path: Path) -> None:
    """Refuse clearly what llama.cpp would refuse obscurely: missing, empty, not GGUF."""
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")


# ---------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class ModelInfo:
    """What guardrail needs to know about a model; also what `guardrail info` prints."""

    path: str
    architecture: str
    name: str
    n_layer: int
    n_embd: int
    n_ctx_train: int
    n_vocab: int
    n_params: int
    size_bytes: int
    chat_template: str | None
    add_bos: bool
    n_head_kv: int = 0
    head_dim: int = 0

    @property
    def kv_bytes_per_token(self) -> int:
        """What one token of context costs in the KV cache (f16 keys and values, every layer)."""
        return 2 * self.n_layer * self.n_head_kv * self.head_dim * 2


def display_name(path: Path) -> str:
    """A known model's name, an Ollama blob's ``ollama:NAME:TAG``, else the file's: never the GGUF's own
    ``general.name``, which is often a training-run label ("Smollm2 135M 8k Lc100K Mix1 Ep2")."""
    for name, known in KNOWN_MODELS.items():
        if known.filename == path.name:
            return name
    return ollama_label(path) or path.stem


class Model:
    """A loaded GGUF model: weights, vocabulary, metadata. Owns the llama_model unless borrowed."""

    def __init__(self, path: str | os.PathLike[str], *, n_gpu_layers: int = -1, vocab_only: bool = False):
        _init_backend()
        self.path = Path(path).expanduser()
        check_gguf(self.path)
        params = llama_low.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 0x7FFFFFFF
        params.vocab_only = vocab_only  # tokenizer and metadata only: no weights, no context possible
        self.vocab_only = vocab_only
        handle = llama_low.llama_model_load_from_file(str(self.path).encode(), params)
        if not handle:
            raise ModelError(f"llama.cpp could not load {self.path}: {_last_llama_error()}")
        self._handle = handle
        self._owner: Any = None  # set when borrowing another object's weights
        self._finish_init()

    @classmethod
    def from_llama(cls, llm: llama_cpp.Llama) -> Model:
        """Share the weights of an existing ``llama_cpp.Llama`` instead of loading them twice."""
        _init_backend()
        self = cls.__new__(cls)
        self.path = Path(llm.model_path)
        self._handle = llm.model
        self._owner = llm  # keeps the Llama (and so the weights) alive; we never free them
        self.vocab_only = bool(llm.model_params.vocab_only)
        self._finish_init()
        return self

    def _finish_init(self) -> None:
        self.vocab = llama_low.llama_model_get_vocab(self._handle)
        self.info = self._read_info()
        self._piece_buf = ctypes.create_string_buffer(256)
        self._eog = {t for t in range(self.info.n_vocab) if llama_low.llama_vocab_is_eog(self.vocab, t)}

    @property
    def handle(self) -> Any:
        """The llama_model pointer (llama-cpp-python's ctypes handle)."""
        if not self._handle:
            raise ModelError("the model was closed")
        return self._handle

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_low.llama_model_meta_val_str(self._handle, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_low.llama_model_meta_val_str(self._handle, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def _read_info(self) -> ModelInfo:
        handle = self._handle
        template = llama_low.llama_model_chat_template(handle, None)
        architecture = self.meta("general.architecture") or "unknown"
        return ModelInfo(
            path=str(self.path),
            architecture=architecture,
            name=display_name(self.path),
            n_layer=llama_low.llama_model_n_layer(handle),
            n_embd=llama_low.llama_model_n_embd(handle),
            n_ctx_train=llama_low.llama_model_n_ctx_train(handle),
            n_vocab=llama_low.llama_vocab_n_tokens(self.vocab),
            n_params=llama_low.llama_model_n_params(handle),
            size_bytes=self.path.stat().st_size if self.path.is_file() else 0,
            chat_template=template.decode("utf-8", errors="replace") if template else None,
            add_bos=bool(llama_low.llama_vocab_get_add_bos(self.vocab)),
            # A vocab-only model has no layers: llama.cpp aborts when asked for their heads.
            n_head_kv=0 if self.vocab_only else llama_low.llama_model_n_head_kv(handle),
            head_dim=0 if self.vocab_only else int(self.meta(f"{architecture}.attention.key_length") or 0)
            or llama_low.llama_model_n_embd(handle) // max(1, llama_low.llama_model_n_head(handle)),
        )

    # -- tokens ---------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """Text to token ids. ``special=True`` only for template markup we wrote ourselves."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_low.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, special)
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_low.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, special)
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        buf = self._piece_buf
        n = llama_low.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_low.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return b"".join(self.piece(t, special=special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    @property
    def bos(self) -> int:
        return int(llama_low.llama_vocab_bos(self.vocab))

    def is_control(self, token: int) -> bool:
        return bool(llama_low.llama_vocab_is_control(self.vocab, token))

    def close(self) -> None:
        if self._handle and self._owner is None:
            llama_low.llama_model_free(self._handle)
        self._handle = None
        self._owner = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            self.close()


def default_threads() -> int:
    """Threads for llama.cpp: $GUARDRAIL_THREADS, else every core (decoding here is compute-bound)."""
    explicit = os.environ.get("GUARDRAIL_THREADS", "").strip()
    return int(explicit) if explicit.isdigit() and int(explicit) > 0 else max(1, os.cpu_count() or 1)


KV_BUDGET_BYTES = 4 << 30   # the most a default context may take in KV memory
KV_BUDGET_SHARE = 8          # ... and at most this share of the machine's memory (1/8)


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_n_ctx(model: Model, slots: int = 1) -> int:
    """The model's own trained context for each of ``slots`` conversations, where memory allows:
    the KV cache stays under 4 GiB and an eighth of this machine's memory; otherwise the largest
    multiple of 256 tokens that does (the slots share it)."""
    info = model.info
    budget = KV_BUDGET_BYTES
    memory = physical_memory()
    if memory:
        budget = min(budget, memory // KV_BUDGET_SHARE)
    per_token = max(1, info.kv_bytes_per_token)
    fits = max(512, (budget // per_token) // 256 * 256)
    return int(min(info.n_ctx_train * max(1, slots), fits)) if info.n_ctx_train > 0 else int(fits)


def gpu_offload() -> bool:
    """True when this llama.cpp build can run layers on a GPU (Metal, CUDA, ...)."""
    return bool(llama_low.llama_supports_gpu_offload())


def default_flash_attn(answers: int) -> bool | None:
    """Flash attention for a context that decodes ``answers`` at once: off for one answer on a
    CPU-only build (``llama_cpp.Llama``'s default), else None (llama.cpp's choice: on).

    Measured on the 2-core CPU (README, "A chat that keeps its cache"): with it off a chat's first token
    came at 1.04x/1.03x Llama's at turns 6 and 10, against 1.24x/1.41x with it on; answer tokens
    then come about 12% slower, as Llama's do. With several answers in one cache it must stay on:
    off, attention computes every other answer's masked cells (one answer beside 7 others' 600
    cells: 12 tokens/s against 25)."""
    return False if answers == 1 and not gpu_offload() else None


# ---------------------------------------------------------------------------
# Sampling


#: answer tokens when a caller sets no limit (every surface's default: library, CLI, server, llm plugin)
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's sampler chain settings. ``temperature <= 0`` means greedy. Its defaults are every
    surface's sampling defaults (the CLI's flags, the llm plugin's, the tests' fake guard)."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None


class Sampler:
    """Owns a llama.cpp sampler chain built from :class:`SamplingParams`."""

    def __init__(self, model: Model, params: SamplingParams | None = None):
        params = params or SamplingParams()
        self.params = params
        chain_params = llama_low.llama_sampler_chain_default_params()
        self._chain = llama_low.llama_sampler_chain_init(chain_params)
        def add(sampler: Any) -> None:
            llama_low.llama_sampler_chain_add(self._chain, sampler)
        if params.repeat_penalty != 1.0:
            penalties: tuple[float, ...] = (params.repeat_last_n, params.repeat_penalty, 0.0, 0.0)
            if len(llama_low.llama_sampler_init_penalties.argtypes) == 5:  # llama-cpp-python >= 0.3.35
                penalties = (model.info.n_vocab, *penalties)
            add(llama_low.llama_sampler_init_penalties(*penalties))
        if params.temperature <= 0:
            add(llama_low.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(llama_low.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(llama_low.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0:
            add(llama_low.llama_sampler_init_min_p(params.min_p, 1))
        add(llama_low.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        add(llama_low.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, context: Context, batch_index: int) -> int:
        """Sample from the logits of one output token of the last decode (and accept it)."""
        return int(llama_low.llama_sampler_sample(self._chain, context.handle, batch_index))

    def accept(self, token: int) -> None:
        """Tell the chain about a token we forced (e.g. the refusal opener), for its penalties."""
        llama_low.llama_sampler_accept(self._chain, token)

    def close(self) -> None:
        if self._chain:
            llama_low.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        self.close()


class Detokenizer:
    """Incremental token -> text that never splits a multi-byte UTF-8 character."""

    def __init__(self, model: Model):
        self.model = model
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self.model.piece(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


# ---------------------------------------------------------------------------
# The context


@dataclass(frozen=True)
class Entry:
    """One token of a batch: which sequences it joins, at what position, with logits or not."""

    token: int
    pos: int
    seqs: tuple[int, ...] = (0,)
    output: bool = False


@dataclass(frozen=True)
class DecodeResult:
    """What one ``llama_decode`` gave: the batch indices with logits, and captured states."""

    outputs: np.ndarray
    states: BatchStates | None


class Context:
    """A llama.cpp context on a model: KV cache (unified, several sequences), batches, capture.

    ``hooks`` names the hidden states to capture (``l_out-<i>``, ``result_norm``);
    they are captured for every decode while the capture is enabled.
    """

    def __init__(self, model: Model, *, n_ctx: int = 2048, n_batch: int = 512, n_ubatch: int | None = None,
                 n_seq_max: int = 2, hooks: Sequence[str] = (), embeddings: bool = False,
                 n_threads: int | None = None, flash_attn: bool | None = None, kv_unified: bool = True):
        self.model = model
        self.flash_attn = flash_attn  # None: llama.cpp's own choice
        info = model.info
        if model.vocab_only:  # llama.cpp would make the context and crash on the first decode
            raise ContextError(f"{info.name} was loaded vocab-only (tokenizer only); load its weights to decode")
        if n_ctx <= 0:
            n_ctx = info.n_ctx_train
        self.capture = (NativeCapture(hooks, n_embd=info.n_embd, n_layer=info.n_layer,
                                      capacity_rows=n_batch) if hooks else None)
        params = llama_low.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch or n_batch, n_batch)
        params.n_seq_max = n_seq_max
        # Unified: probe cells are shared across sequences and micro-batches keep batch order (the
        # capture relies on it). Split (one KV stream per sequence), attention reads only a
        # sequence's own cells, but llama.cpp regroups a batch by sequence.
        params.kv_unified = kv_unified
        if flash_attn is not None and hasattr(params, "flash_attn_type"):  # None: llama.cpp's own choice
            params.flash_attn_type = int(flash_attn)
        elif flash_attn is not None and hasattr(params, "flash_attn"):  # llama-cpp-python < 0.3.16
            params.flash_attn = bool(flash_attn)
        params.embeddings = embeddings
        # One state per token, never pooled: the capture's result_norm relies on it.
        params.pooling_type = llama_low.LLAMA_POOLING_TYPE_NONE
        threads = n_threads or default_threads()
        self.n_threads = threads
        params.n_threads = threads
        params.n_threads_batch = threads
        if self.capture is not None:
            params.cb_eval = self.capture.callback
            params.cb_eval_user_data = self.capture.user_data
        handle = llama_low.llama_init_from_model(model.handle, params)
        if not handle:
            raise ContextError(f"llama.cpp could not create a context (n_ctx={n_ctx}): {_last_llama_error()}")
        self._handle = handle
        self.n_ctx = int(llama_low.llama_n_ctx(handle))
        # Never more than asked: the capture holds n_batch rows, and llama.cpp before 0.3.16 raised a
        # small n_batch to 64 (GGML_KQ_MASK_PAD).
        self.n_batch = min(n_batch, int(llama_low.llama_n_batch(handle)))
        self.n_seq_max = n_seq_max
        self._memory = llama_low.llama_get_memory(handle)
        self._batch = llama_low.llama_batch_init(self.n_batch, 0, n_seq_max)

    @property
    def handle(self) -> Any:
        """The llama_context pointer (llama-cpp-python's ctypes handle)."""
        if not self._handle:
            raise ContextError("the context was closed")
        return self._handle

    def decode(self, entries: Sequence[Entry]) -> DecodeResult:
        """One ``llama_decode`` of up to ``n_batch`` tokens; raises on failure."""
        n = len(entries)
        if n == 0 or n > self.n_batch:
            raise ContextError(f"a batch holds 1..{self.n_batch} tokens, got {n}")
        batch = self._batch
        outputs = []
        for i, entry in enumerate(entries):
            if not 0 <= entry.pos < self.n_ctx:
                raise ContextOverflowError(f"position {entry.pos} is outside the context of {self.n_ctx} tokens")
            batch.token[i] = entry.token
            batch.pos[i] = entry.pos
            batch.n_seq_id[i] = len(entry.seqs)
            for j, seq in enumerate(entry.seqs):
                batch.seq_id[i][j] = seq
            batch.logits[i] = entry.output
            if entry.output:
                outputs.append(i)
        batch.n_tokens = n
        if self.capture is not None:
            self.capture.reset()
        status = llama_low.llama_decode(self.handle, batch)
        if status == 1:
            raise ContextOverflowError("the KV cache is full: the conversation does not fit the context")
        if status != 0:
            raise ContextError(f"llama_decode failed ({status}): {_last_llama_error()}")
        index = np.asarray(outputs, dtype=np.int64)
        states = self.capture.collect(n, index) if self.capture is not None else None
        return DecodeResult(index, states)

    def logits(self, batch_index: int) -> np.ndarray:
        """Logits of one output token of the last decode (a copy)."""
        ptr = llama_low.llama_get_logits_ith(self.handle, batch_index)
        return np.array(np.ctypeslib.as_array(ptr, shape=(self.model.info.n_vocab,)), np.float32)

    def embedding(self, batch_index: int) -> np.ndarray:
        """The final normed state of one output token (contexts made with embeddings=True)."""
        ptr = llama_low.llama_get_embeddings_ith(self.handle, batch_index)
        if not ptr:
            raise ContextError("no embedding for that token (was the context made with embeddings=True?)")
        return np.array(np.ctypeslib.as_array(ptr, shape=(self.model.info.n_embd,)), np.float32)

    # -- KV sequences -----------------------------------------------------------

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Give ``dst`` the cells of ``src`` in [p0, p1): shared, not duplicated."""
        llama_low.llama_memory_seq_cp(self._memory, src, dst, p0, p1)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        if not llama_low.llama_memory_seq_rm(self._memory, seq, p0, p1):
            raise ContextError(f"could not remove cells [{p0}, {p1}) of sequence {seq}")

    def seq_pos_max(self, seq: int) -> int:
        """Last position held by ``seq``; -1 when it is empty."""
        return int(llama_low.llama_memory_seq_pos_max(self._memory, seq))

    def clear(self) -> None:
        llama_low.llama_memory_clear(self._memory, True)

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            llama_low.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_handle", None):
            llama_low.llama_free(self._handle)
            self._handle = None
        capture = getattr(self, "capture", None)
        if capture is not None:
            capture.close()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Decoding a prompt and generating on sequence 0


@dataclass(frozen=True)
class TokenStep:
    """One generated token: id, text piece, position, and its captured hidden states.

    ``states`` maps hook name -> that token's state (a view, valid until the next
    decode); it is None for an end-of-generation token, which is never decoded.
    """

    token: int
    text: str
    pos: int
    states: dict[str, np.ndarray] | None
    eog: bool = False


def prefill(context: Context, tokens: Sequence[int], *, seq: int = 0, start: int = 0,
            on_chunk: Any = None) -> DecodeResult:
    """Decode a prompt in ``n_batch`` chunks; the last token gets logits.

    ``on_chunk(offset, result)`` sees each chunk's captured states (they are
    overwritten by the next chunk).
    """
    if start + len(tokens) > context.n_ctx:
        raise ContextOverflowError(
            f"the prompt is {start + len(tokens)} tokens; the context holds {context.n_ctx}")
    if not tokens:
        raise ContextError("nothing to decode: the prompt is empty")
    result = None
    for offset in range(0, len(tokens), context.n_batch):
        chunk = tokens[offset:offset + context.n_batch]
        last = offset + len(chunk) == len(tokens)
        entries = [Entry(t, start + offset + i, (seq,), last and i == len(chunk) - 1)
                   for i, t in enumerate(chunk)]
        result = context.decode(entries)
        if on_chunk is not None:
            on_chunk(offset, result)
    assert result is not None
    return result


def generate(context: Context, prompt: Sequence[int], sampler: Sampler, *, max_tokens: int = 128,
             seq: int = 0) -> Iterator[TokenStep]:
    """Stream tokens after a prompt, each with the hidden states llama.cpp computed for it.

    A token's states exist once it has been decoded, so each step is yielded
    right after its decode; an end-of-generation token ends the stream unseen
    by the model (``eog=True``, no states).
    """
    model = context.model
    result = prefill(context, prompt, seq=seq)
    pos = len(prompt)
    detok = Detokenizer(model)
    for _ in range(max_tokens):
        token = sampler.sample(context, int(result.outputs[-1]))
        if model.is_eog(token):
            yield TokenStep(token, detok.flush(), pos, None, eog=True)
            return
        if pos >= context.n_ctx:
            raise ContextOverflowError(f"the answer reached the end of the context ({context.n_ctx} tokens)")
        result = context.decode([Entry(token, pos, (seq,), True)])
        states = None
        if result.states is not None:
            states = {name: result.states.of(name, 0) for name in result.states.rows}
        yield TokenStep(token, detok.push(token), pos, states)
        pos += 1
