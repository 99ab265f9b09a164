"""llama.cpp backend: GGUF models run by llama.cpp on the CPU, through llama-cpp-python's low-level API.

Owns: `LlamaCppModel`, a handle on one GGUF file that llama.cpp has loaded (weights mmapped once, shared by
every context made from it); `load_gguf`, which makes a `LoadedModel` of such a handle and the tokenizer
transformers reads from the same file, so a GGUF pair never builds the float32 transformers models (about
10 GB for the default pair, against 2.4 GB here); and two runners, each with its own llama.cpp context and KV
cache:
- `LlamaCppRunner`, batch 1, the interface of `ead.runner.ModelRunner`: `reset()`, `seen`, `feed(ids) -> (V,)`.
- `LlamaCppBatchRunner`, the batched interface of `ead.runner.HFBatchRunner`: `max_batch` sequences in one
  context, one KV stream per slot; `feed_many` appends every listed slot's new tokens in ONE `llama_decode`.
Leaves to others: the EAD rule, entropy and sampling (torch, `ead.engine`), and choosing this backend
(`ead.runner.choose_backend`). Logits come back as float32 CPU tensors, so the engine cannot tell it apart.

Only the last new token of each slot asks for logits (`llama_batch.logits` flags, read with
`llama_get_logits_ith`): the high-level `Llama(logits_all=True)` would keep n_ctx x vocab x 4 bytes (2.5 GB for
Qwen2.5 at 4096 tokens). Speculative verification (`feed_many(..., all_logits=True)`) asks for every new token's
logits; llama.cpp aborts a decode with more logits rows than the context's `n_outputs_max`, a buffer of vocab
floats per row (0.6 MB for Qwen2.5) reserved up front but touched only where written, so it is MAX_OUTPUTS rows
(and 16 per slot at least): the first verification, which also reads the prompt, is then one decode as a
prefill is (in pieces of 16 tokens the default pair's 140-token prompt took 2.35 s instead of 1.72, and 1.41
last-only); a longer feed is decoded in consecutive pieces. `truncate(slot, n)` drops a rejected draft's cells
(`llama_memory_seq_rm`), so speculation and EAD + speculation run on this backend as on the others.

Known difference: llama.cpp's CPU logits depend on how tokens are batched. A token decoded alone and the same
token inside a catch-up or prompt batch go through different matmul kernels (one row against many, the
activations quantized to 8 bits either way), so on the default pair's 4-bit weights their logits differ by a
few tenths of a logit: fed token by token vs the whole prefix in one pass, the largest difference over the
vocabulary was 0.27 for the median token and 0.42 at worst over 200 random ids, 0.94 at worst over a GSM8K
answer, while the median difference over the vocabulary stays under 0.12. Replaying the same chunks in a fresh context gives the same logits, and the argmax agrees with
the one-pass evaluation wherever the top two are not nearly tied; tests/backends/test_llamacpp.py checks both.
For the same reason a slot's row from `feed_many` depends on the slots fed with it (llama.cpp splits one call
into ubatches of equal tokens per slot): up to 0.37 logit from the same chunks fed alone. So greedy EAD here
can pick another token than the transformers backend, or than the same request run alone, where a near-tie
falls the other way.

Threads: llama.cpp uses `n_threads` (default `os.cpu_count()`) for every decode, through its OpenMP pool. The
engine's per-token math (entropy and argmax over ~150k logits) runs in torch between two decodes, on torch's
own pool; numpy is not touched per token. On this project's 2-core machine a decode loop of the 0.5B model
with the engine's per-token `token_signals` and argmax ran at 47.3 tok/s with torch at 2 threads and 47.5 at 1
(best of 4 runs of 24 tokens), so torch keeps its setting. What does hurt is any other busy process: both
pools spin-wait at barriers, and other programs using the 2 cores dropped the same loop to 2-9 tok/s.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ead.errors import CacheCapacityError, ConfigError, ModelLoadError
from ead.models.sources import LoadedModel

# KV cells are allocated for the whole context up front: 4096 tokens cost Qwen2.5-1.5B 115 MB of f16 keys and
# values per slot, where its 32768 trained positions would cost 0.9 GB (as the native backend's default).
DEFAULT_MAX_SEQ_TOKENS = 4096
# Logits rows one llama_decode may return (see the module docstring): 512 rows of Qwen2.5's vocabulary are 311 MB
# of address space, of which only the rows a decode writes take memory; at least 16 per slot (one token and a
# draft of up to 15).
MAX_OUTPUTS, OUTPUTS_PER_SLOT = 512, 16
INSTALL = "pip install 'ead[llamacpp]'"


def import_llama_cpp() -> ModuleType:
    """The `llama_cpp` module, with llama.cpp's own log lines (hundreds per model load) kept to errors."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ConfigError(f"backend 'llamacpp' needs the llama-cpp-python package, which cannot be imported "
                          f"({e}); install it with `{INSTALL}`, or choose --backend hf") from None
    _log_errors_only(llama_cpp)
    return llama_cpp


@functools.cache  # installed once; the cache also keeps the ctypes callback alive while llama.cpp holds it
def _log_errors_only(lib: ModuleType) -> object:
    # llama-cpp-python's own callback maps the levels of an older ggml (where 3 meant ERROR), so it prints
    # every warning; this one prints GGML_LOG_LEVEL_ERROR (4) only.
    def log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == 4:
            sys.stderr.write(text.decode("utf-8", "replace"))

    callback = lib.llama_log_callback(log)
    lib.llama_log_set(callback, ctypes.c_void_p(0))
    return callback


def is_llamacpp_model(model: object) -> bool:
    return isinstance(model, LlamaCppModel)


class LlamaCppModel:
    """One GGUF file loaded by llama.cpp for the CPU. It stands where a transformers model stands in a
    `LoadedModel`: `config.vocab_size`, `config.max_position_embeddings` (the trained context), `device`,
    `generation_config` (None: the EOS ids come from the GGUF's tokenizer), plus `path` and `n_threads`."""

    device = torch.device("cpu")
    generation_config = None

    def __init__(self, path: Path, n_threads: int | None = None) -> None:
        self.lib = import_llama_cpp()
        self.path = Path(path)
        params = self.lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.ptr = self.lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not load GGUF file {str(self.path)!r} (unsupported architecture "
                                 "or a damaged file); try --backend hf, which reads GGUF through transformers")
        weakref.finalize(self, self.lib.llama_model_free, self.ptr)  # after every context: they hold `self`
        vocab = self.lib.llama_model_get_vocab(self.ptr)
        self.config = SimpleNamespace(vocab_size=int(self.lib.llama_vocab_n_tokens(vocab)),
                                      max_position_embeddings=int(self.lib.llama_model_n_ctx_train(self.ptr)))
        self.params = int(self.lib.llama_model_n_params(self.ptr))  # embeddings and output head included
        self.n_threads = n_threads or os.cpu_count() or 1


def load_gguf(source: str, cache_root: Path) -> LoadedModel:
    """A GGUF file as a LoadedModel for this backend: the llama.cpp handle and the file's tokenizer.
    Raises ConfigError for a source that is no .gguf file, ModelLoadError for a missing or unreadable one."""
    path = Path(source).expanduser()
    if path.suffix.lower() != ".gguf":
        raise ConfigError(f"backend 'llamacpp' runs GGUF files only, got {source!r}; pass .gguf files "
                          "(--small A.gguf --large B.gguf), or use --backend hf for this model")
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {source!r} does not exist; pass the path of a .gguf file")
    model = LlamaCppModel(path)
    tokenizer = gguf_tokenizer(path, Path(cache_root))
    return LoadedModel(source=source, path=str(path), model=model, tokenizer=tokenizer, params=model.params)


def gguf_tokenizer(gguf: Path, cache_root: Path) -> PreTrainedTokenizerBase:
    """The tokenizer transformers builds from `gguf`'s metadata (as `ead.models.sources` does on the hf path),
    saved once under cache_root/tokenizers: building Qwen2.5's 152k tokens takes about 20 s, reading the
    saved copy about 1 s. Keyed like converted models, by path, size and mtime, and written atomically."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root / "tokenizers" / f"{gguf.stem}-{key}"
    if (out / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(out))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise ModelLoadError(f"could not read the tokenizer of GGUF file {str(gguf)!r}: {e}") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "tokenizer_config.json").is_file():  # no other process finished it: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


class LlamaCppBatchRunner:
    """`max_batch` sequences in one llama.cpp context, slot i being sequence id i with its own KV stream of
    `max_seq_tokens` cells (`kv_unified=False`), so a slot's attention never reads another slot's cells."""

    def __init__(self, model: LlamaCppModel, vocab_size: int, max_seq_tokens: int | None = None,
                 max_batch: int = 1) -> None:
        from ead.runner import resolve_max_seq_tokens

        assert vocab_size <= model.config.vocab_size, "logits are read on at most the model's vocabulary"
        lib = self.lib = model.lib
        self.model, self.vocab_size, self.max_batch = model, vocab_size, max_batch
        limit = model.config.max_position_embeddings
        self.max_seq_tokens = resolve_max_seq_tokens(max_seq_tokens, limit, min(limit, DEFAULT_MAX_SEQ_TOKENS))
        params = lib.llama_context_default_params()
        params.n_seq_max = max_batch
        params.kv_unified = False
        params.n_ctx = -(-self.max_seq_tokens // 256) * 256 * max_batch  # llama.cpp pads each slot's cells to 256
        params.n_batch = params.n_ctx  # any catch-up is one llama_decode; llama.cpp splits it into ubatches
        params.n_outputs_max = self.max_outputs = max(MAX_OUTPUTS, OUTPUTS_PER_SLOT * max_batch)  # never n_ctx rows
        params.n_threads = params.n_threads_batch = model.n_threads
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(model.ptr, params)
        if not self.ctx:
            raise ModelLoadError(f"llama.cpp could not make a context of {params.n_ctx} tokens for "
                                 f"{str(model.path)!r} (out of memory?); lower max_seq_tokens")
        weakref.finalize(self, lib.llama_free, self.ctx)
        self.memory = lib.llama_get_memory(self.ctx)
        # Allocated once for the largest call; every field is rewritten for the tokens each call uses.
        self.batch = lib.llama_batch_init(params.n_batch, 0, 1)
        weakref.finalize(self, lib.llama_batch_free, self.batch)
        self.seen = [0] * max_batch

    def reset(self, slot: int) -> None:
        """Forget slot `slot`'s sequence: its cells are removed from the KV cache (llama_memory_seq_rm)."""
        self.lib.llama_memory_seq_rm(self.memory, slot, -1, -1)
        self.seen[slot] = 0

    def truncate(self, slot: int, n_tokens: int) -> None:
        """Roll `slot` back to its first `n_tokens` tokens (speculation drops a rejected draft): its cells at
        positions n_tokens and later leave the KV cache (llama_memory_seq_rm), and the next tokens take them."""
        assert 0 <= n_tokens <= self.seen[slot], f"truncate slot {slot} to {n_tokens} tokens of {self.seen[slot]}"
        if n_tokens < self.seen[slot] and not self.lib.llama_memory_seq_rm(self.memory, slot, n_tokens, -1):
            raise RuntimeError(f"llama_memory_seq_rm refused to drop slot {slot}'s cells from position {n_tokens}")
        self.seen[slot] = n_tokens

    def feed_many(self, slots: Sequence[int], ids: Sequence[list[int]],
                  all_logits: bool = False) -> Tensor | list[Tensor]:
        """Append `ids[i]` (at least one token; counts may differ) to slot `slots[i]`, all in one llama_decode
        with per-token sequence ids and positions, and return the logits after each slot's last new token:
        (len(slots), V) float32 on the CPU. With `all_logits`, the logits after every new token, a list of
        (len(ids[i]), V) (speculative verification; more than `max_outputs` tokens take several decodes).
        Raises CacheCapacityError, before any work, when a slot would overflow; slots not listed are untouched."""
        assert slots and len(slots) == len(ids) == len(set(slots)) and all(ids), \
            "feed_many needs distinct slots, each with at least one new token"
        for s, t in zip(slots, ids):
            if self.seen[s] + len(t) > self.max_seq_tokens:
                raise CacheCapacityError(f"slot {s} holds {self.seen[s]} tokens and {len(t)} more need "
                                         f"{self.seen[s] + len(t)} tokens, but max_seq_tokens={self.max_seq_tokens}; "
                                         "shorten the prompt or raise max_seq_tokens")
        # (slot, token, wants logits) in feed order: every token, or each slot's last one
        tokens = [(s, token, all_logits or j == len(t) - 1) for s, t in zip(slots, ids) for j, token in enumerate(t)]
        step = self.max_outputs if all_logits else len(tokens)
        parts = [self._decode(tokens[i: i + step]) for i in range(0, len(tokens), step)]
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)  # (rows, V)
        return list(logits.split([len(t) for t in ids])) if all_logits else logits

    def _decode(self, tokens: list[tuple[int, int, bool]]) -> Tensor:
        """One llama_decode of (slot, token id, wants logits), each token at its slot's next position; returns
        the logits rows asked for, in order: (rows, V) float32."""
        b, outputs, seen = self.batch, [], list(self.seen)
        for n, (s, token, wanted) in enumerate(tokens):
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, seen[s], 1, int(wanted)
            b.seq_id[n][0] = s
            seen[s] += 1
            if wanted:
                outputs.append(n)
        b.n_tokens = len(tokens)
        status = self.lib.llama_decode(self.ctx, b)
        if status != 0:  # capacity was checked by the caller, so this is llama.cpp failing, not the request
            raise RuntimeError(f"llama_decode returned {status} for {len(tokens)} tokens in slots "
                               f"{sorted({s for s, _, _ in tokens})}")
        self.seen = seen
        logits = torch.empty((len(outputs), self.vocab_size), dtype=torch.float32)  # (rows, V)
        for row, i in enumerate(outputs):
            ctypes.memmove(logits[row].data_ptr(), self.lib.llama_get_logits_ith(self.ctx, i), self.vocab_size * 4)
        return logits


class LlamaCppRunner:
    """Batch 1, the interface of `ead.runner.ModelRunner`: a LlamaCppBatchRunner with one slot."""

    def __init__(self, model: LlamaCppModel, vocab_size: int, max_seq_tokens: int | None = None) -> None:
        self.rows = LlamaCppBatchRunner(model, vocab_size, max_seq_tokens, max_batch=1)
        self.vocab_size, self.max_seq_tokens = vocab_size, self.rows.max_seq_tokens

    @property
    def seen(self) -> int:
        return self.rows.seen[0]

    def reset(self) -> None:
        """Forget the current sequence (a new request starts)."""
        self.rows.reset(0)

    def feed(self, token_ids: list[int]) -> Tensor:
        """Process `token_ids` (the tokens this model has not seen yet) in one llama_decode and return the
        logits for the token after them: (V,) float32 on the CPU."""
        return self.rows.feed_many([0], [token_ids])[0]
