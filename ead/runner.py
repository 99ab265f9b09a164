"""Runners: one model and its KV caches, behind the few operations the engine uses.

`ModelRunner` is one transformers model with one DynamicCache: `feed(ids)` appends tokens in one forward pass
and returns the next-token logits, `seen` counts the cached tokens, `reset()` starts over. Prefill, one-token
decode and the catch-up after a switch are the same call with different lengths.

The engine runs batched runners, one slot per sequence (see HFBatchRunner for the interface):
- `HFBatchRunner`: a ModelRunner per slot, fed one after another. On a GPU it is launch-bound (about 12 tok/s
  on an H100 at every model size), so there EAD saves no time; it is the reference and the fallback.
- `NativeBatchRunner`: ead's own decoder (`ead.models`) on a KV cache allocated once, its passes replayed as
  CUDA graphs (`ead.models.graphs`).
`choose_backend` and `build_batch_runner` turn `EngineConfig.backend` into one of them, or into the llama.cpp
runner for GGUF files on a CPU (`ead.backends.llamacpp`).
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from ead.backends.llamacpp import LlamaCppBatchRunner, is_llamacpp_model
from ead.config import EngineConfig
from ead.errors import ConfigError, ModelLoadError
from ead.models.graphs import DecodeGraph
from ead.models.kv_cache import KVCache
from ead.models.loader import load_native
from ead.models.transformer import EAGER, ModelArgs, Transformer
from ead.router import logits_with_summary

# The native cache is allocated up front for the whole context, so its default is bounded: 4096 tokens cost
# Qwen2.5-14B 0.8 GB of keys and values, where its 32768 positions would cost 6.4 GB per model.
DEFAULT_NATIVE_MAX_SEQ_TOKENS = 4096


class ModelRunner:
    def __init__(self, model: PreTrainedModel, vocab_size: int, max_seq_tokens: int | None = None) -> None:
        self.model = model
        self.device = model.device
        # Both models' logits are read on the same width (some exports pad one head with unused rows).
        self.vocab_size = vocab_size
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.max_seq_tokens = resolve_max_seq_tokens(max_seq_tokens, limit, default=limit)
        self.cache: DynamicCache | None = None
        self.seen = 0
        # transformers renamed `past_key_values` to `cache` in 5.2x; pass whichever this version's forward takes.
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def reset(self) -> None:
        """Forget the current sequence (a new request starts)."""
        self.cache, self.seen = None, 0

    def truncate(self, n_tokens: int) -> None:
        """Keep only the first `n_tokens` cached tokens (speculation drops a rejected draft)."""
        assert 0 <= n_tokens <= self.seen, f"truncate to {n_tokens} tokens of {self.seen}"
        if n_tokens < self.seen:
            self.cache.crop(n_tokens - self.seen)  # transformers 5: a negative count removes that many tokens
        self.seen = n_tokens

    @torch.inference_mode()
    def feed(self, token_ids: list[int], all_logits: bool = False) -> Tensor:
        """Process `token_ids` (the tokens this model has not seen yet) and return the logits for the token
        after them: (V,) float32 on the model's device; only the last position goes through the LM head. With
        `all_logits`, the logits after every new token: (T, V) float32 (speculative verification)."""
        assert token_ids, "feed needs at least one new token"
        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # (1, T)
        keep = len(token_ids) if all_logits else 1
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **{self.cache_kwarg: self.cache})
        self.seen += len(token_ids)
        logits = out.logits[0, :, : self.vocab_size].float()  # (keep, V)
        return logits if all_logits else logits[-1]


class HFBatchRunner:
    """The batched runner interface over transformers: one ModelRunner (its own DynamicCache) per slot, fed
    one after another. Correct for any architecture and slow; the fallback and the reference.

    The batched interface, shared by every backend: `max_batch`, `max_seq_tokens`, `vocab_size`, `seen[slot]`
    (tokens the slot's cache holds), `reset(slot)`, and `feed_many(slots, ids) -> (len(slots), V)` float32,
    which appends `ids[i]` (at least one token, counts may differ) to slot `slots[i]` and returns the logits
    after each slot's last new token. Slots not listed are untouched.
    Speculative decoding (`ead.speculative`) needs two more, which every backend's runner has:
    `feed_many(..., all_logits=True)` returns a list of (len(ids[i]), V) float32, the logits after every new
    token, and `truncate(slot, n_tokens)` rolls a slot's cache back to its first n tokens.
    """

    def __init__(self, model: PreTrainedModel, vocab_size: int, max_seq_tokens: int | None = None,
                 max_batch: int = 1) -> None:
        self.rows = [ModelRunner(model, vocab_size, max_seq_tokens) for _ in range(max_batch)]
        self.max_batch, self.vocab_size = max_batch, vocab_size
        self.max_seq_tokens = self.rows[0].max_seq_tokens

    @property
    def seen(self) -> list[int]:
        return [r.seen for r in self.rows]

    def reset(self, slot: int) -> None:
        self.rows[slot].reset()

    def truncate(self, slot: int, n_tokens: int) -> None:
        self.rows[slot].truncate(n_tokens)

    def feed_many(self, slots: Sequence[int], ids: Sequence[list[int]],
                  all_logits: bool = False) -> Tensor | list[Tensor]:
        out = [self.rows[s].feed(t, all_logits) for s, t in zip(slots, ids, strict=True)]
        return out if all_logits else torch.stack(out)


class NativeBatchRunner:
    """ead's decoder on a KVCache of `max_batch` rows, one slot per row, allocated once.

    `feed_many` runs at most two forward passes:
    1. catch-up: the slots that bring more than one token (a prompt, or what the other model wrote) feed all
       of them in one pass over just those rows (gathered), right-padded to a width bucket; rows that fill the
       cache's first rows (their bucket) run over those rows in place instead, as a decode does;
    2. decode: the slots that bring one token, over cache rows 0..B-1, B the smallest batch bucket (1, 2, 4,
       ..., max_batch) holding them, other rows idle.
    When both kinds come and the decode rows add at most MERGE_TOKENS padded tokens to the catch-up pass, they join
    it instead: one read of the weights, not two. A catch-up too wide for a graph runs in chunks through graphs,
    or eagerly, padded only to its longest row, whichever `_plan` prices lower; eager rows that differ in length
    are split (`_split`) into passes of rows of similar length, where that saves more padded tokens than the extra
    passes cost.
    On CUDA both are replayed graphs, one per (rows, width, span) bucket, captured on first use (or ahead with
    `capture_graphs`); a catch-up of more than MAX_GRAPH_TOKENS padded tokens (a long prompt, or many rows at
    once) runs in chunks or eagerly (`_plan`: eagerly where launches matter less beside its compute). Attention reads a span of slots bucketed to a
    power of two (at least 256) over the longest row, so a short sequence does not pay for the whole
    preallocated context. Host-side bookkeeping (`seen`) means no device sync here.
    Speculation's verification (`all_logits`) is one gathered pass like a catch-up, returning every position's
    logits; it too replays a graph per (rows, width, span) bucket (`verify_graphs`, widths up to MAX_VERIFY_WIDTH).
    `decode_from_device` is the decode pass fed tokens that are still on the device (the engine's lookahead).
    """

    MIN_SPAN = 256
    MAX_GRAPH_WIDTH = 256
    MAX_GRAPH_TOKENS = 1024
    # A round that mixes rows bringing one token with rows catching up runs as one padded catch-up pass (one read
    # of the weights) instead of a decode and a catch-up (two), when the rows that join the catch-up add at most
    # this many padded tokens to it (none when they fit its row bucket): a pass of a large model costs about its
    # weight read up to a few hundred tokens, whatever its width.
    MERGE_TOKENS = 256
    # A catch-up too wide for one graph runs eagerly, or in chunks through graphs of at most MAX_CHUNK_PASSES
    # passes where those pad fewer tokens than the eager pass costs, priced at least what its launches cost
    # (`_plan`, `calibrate_eager`; EAGER_TOKENS without graphs): the host's, which a graph replay does not pay.
    MAX_CHUNK_PASSES = 4
    EAGER_TOKENS = 1024
    # A catch-up of rows lying in cache rows 0..B-1, B its row bucket, of at most this many tokens a row replays a
    # graph over those rows in place (`_catch_up_prefix`), as the decode does.
    MAX_PREFIX_WIDTH = 16
    # Speculative verification (every position's logits) replays a graph for one token and a draft of up to 15
    # per row, at most MAX_VERIFY_TOKENS padded tokens: the float32 buffer the verification graphs share holds
    # that many rows of logits (311 MB for Qwen2.5's vocabulary). Wider passes (a prompt, a hybrid catch-up)
    # run eagerly.
    MAX_VERIFY_WIDTH = 16
    MAX_VERIFY_TOKENS = 512

    def __init__(self, model: Transformer, vocab_size: int, max_seq_tokens: int | None = None,
                 cuda_graphs: bool = True, max_batch: int = 1, fused_kernels: bool = False) -> None:
        self.model = model.fuse() if fused_kernels and model.tok_embeddings.weight.is_cuda else model
        weight = model.tok_embeddings.weight
        self.device = weight.device
        self.vocab_size, self.max_batch = vocab_size, max_batch
        limit = model.args.max_position_embeddings
        self.max_seq_tokens = resolve_max_seq_tokens(max_seq_tokens, limit, min(limit, DEFAULT_NATIVE_MAX_SEQ_TOKENS))
        self.cache = KVCache.for_model(model.args, max_batch=max_batch, max_seq_tokens=self.max_seq_tokens,
                                       dtype=weight.dtype, device=self.device)
        self.seen = [0] * max_batch
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs: dict[tuple[int, int, int], DecodeGraph] = {}
        self.verify_graphs: dict[tuple[int, int, int], DecodeGraph] = {}  # (rows, width, span), all logits
        self.prefix_graphs: dict[tuple[int, int, int], DecodeGraph] = {}  # (rows, width, span), cache rows 0..rows-1
        self.verify_out: Tensor | None = None  # their shared output, allocated with the first of them
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.chunk_eager = False  # tests: plan chunked catch-ups without graphs (each chunk then runs eagerly)
        self.eager_tokens: float | None = None  # an eager pass's launches in padded tokens (`calibrate_eager`)

    @classmethod
    def from_hf(cls, hf_model: PreTrainedModel, vocab_size: int, max_seq_tokens: int | None = None,
                cuda_graphs: bool = True, max_batch: int = 1, fused_kernels: bool = False) -> NativeBatchRunner:
        """A runner for a loaded transformers model, on its device and in its dtype. The fused q/k/v and
        gate/up weights are new tensors, the others shared with `hf_model`: while it stays loaded, a Qwen2.5
        model takes about 1.6 times its weight bytes on the device."""
        return cls(load_native(hf_model, hf_model.device, hf_model.dtype), vocab_size, max_seq_tokens, cuda_graphs,
                   max_batch, fused_kernels)

    def reset(self, slot: int) -> None:
        self.cache.reset_row(slot)
        self.seen[slot] = 0

    def truncate(self, slot: int, n_tokens: int) -> None:
        """Roll `slot` back to its first `n_tokens` tokens. Only the lengths move: the keys and values past
        them stay, and the mask hides them (a query at position p sees slots 0..p, see `attention_mask`) until
        the next tokens overwrite them."""
        assert 0 <= n_tokens <= self.seen[slot], f"truncate slot {slot} to {n_tokens} tokens of {self.seen[slot]}"
        self.seen[slot] = n_tokens
        self.cache.lengths[slot] = n_tokens

    def span(self, longest: int) -> int:
        """Slots attention reads for rows of at most `longest` tokens: a power of two >= MIN_SPAN, capped at
        the whole cache (trash slot included)."""
        return min(self.cache.trash_slot + 1, max(self.MIN_SPAN, _pow2(longest)))

    def _catch_up_buckets(self) -> set[tuple[int, int]]:
        """(rows, width) buckets whose catch-up runs as a graph."""
        rows = [1 << i for i in range(self.max_batch.bit_length()) if 1 << i <= _pow2(self.max_batch)]
        widths = [1 << i for i in range(1, self.MAX_GRAPH_WIDTH.bit_length())]
        return {(n, w) for n in rows for w in widths if n * w <= self.MAX_GRAPH_TOKENS}

    def _verify_buckets(self) -> set[tuple[int, int]]:
        """(rows, width) buckets whose verification pass (`feed_many(..., all_logits=True)`) runs as a graph."""
        return {(n, w) for n, w in self._catch_up_buckets()
                if w <= self.MAX_VERIFY_WIDTH and n * w <= self.MAX_VERIFY_TOKENS}

    def capture_graphs(self, longest: int, verify: bool = False) -> int:
        """Capture now every graph that rows of up to `longest` tokens can need (decode at each batch bucket,
        catch-up at each graphed bucket, with `verify` speculative verification at each of its buckets, each span
        up to span(longest)); returns how many exist."""
        if not self.use_graphs:
            return 0
        spans = sorted({self.span(n) for n in range(self.MIN_SPAN, max(longest, self.MIN_SPAN) + 1, self.MIN_SPAN)}
                       | {self.span(longest)})
        batches = {min(self.max_batch, 1 << i) for i in range(self.max_batch.bit_length() + 1)}
        for span in spans:
            for b in sorted(batches):
                self._graph(b, 1, span)
            for n, w in sorted(self._catch_up_buckets()):
                self._graph(n, w, span)
                if w <= self.MAX_PREFIX_WIDTH and n <= self.max_batch:
                    self._graph(n, w, span, prefix=True)
            for n, w in sorted(self._verify_buckets() if verify else ()):
                self._graph(n, w, span, all_logits=True)
        self.calibrate_eager()
        return len(self.graphs) + len(self.verify_graphs) + len(self.prefix_graphs)

    @torch.inference_mode()
    def calibrate_eager(self) -> float:
        """What an eager pass costs beyond the same pass replayed as a graph, in padded tokens of the widest graph
        (its compute per token): `_plan`'s price of an eager pass. Measured once (by `capture_graphs`, or at the
        first plan that needs it: a host sync, some 10-20 passes), on padding rows that leave the cache as it is.
        On an H100 host it measured 6,363 padded tokens for the 1.5B shape and 558-1,168 for the 14B's
        (BENCHMARKS.md, session 8), so the 1.5B chunks nearly every wide catch-up and the 14B only those that pad
        few rows."""
        if self.eager_tokens is not None:
            return self.eager_tokens
        if not self.use_graphs:
            return float(self.EAGER_TOKENS)
        span = self.span(1)
        rows = max(n for n, _ in self._catch_up_buckets())
        wide = max(w for n, w in self._catch_up_buckets() if n == rows)

        def timed(run, times: int = 3) -> float:
            best = math.inf
            for k in range(times):
                torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                run(k)
                torch.cuda.synchronize(self.device)
                best = min(best, time.perf_counter() - t0)
            return best * 1e3

        def replay(n: int, w: int):
            graph = self._graph(n, w, span)
            graph.valid.zero_()  # padding rows: keys and values to the trash slot, no length moves
            return lambda k: graph.graph.replay()

        def eager(k: int):  # a new width each time, as eager catch-ups meet in a run
            w = 61 + k
            zeros = torch.zeros((1, w), dtype=torch.int64, device=self.device)
            self.model(zeros, zeros, self.cache, zeros[:, 0], last_only=True, kv_len=span, rows=zeros[:, 0],
                       kernels=EAGER)

        narrow, widest, graphed = timed(replay(1, 2)), timed(replay(rows, wide)), timed(replay(1, 64))
        per_token = max(widest - narrow, 1e-3) / (rows * wide - 2)
        self.eager_tokens = max(0.0, timed(eager) - graphed) / per_token
        return self.eager_tokens

    def _graph(self, batch: int, width: int, span: int, all_logits: bool = False, prefix: bool = False) -> DecodeGraph:
        """The graph of a pass of `batch` rows of `width` tokens attending over `span` slots, captured on first use:
        the decode (width 1), a catch-up of rows from anywhere in the cache, a catch-up of cache rows 0..batch-1
        (`prefix`, `_catch_up_prefix`), or a verification (`all_logits`)."""
        graphs = self.verify_graphs if all_logits else self.prefix_graphs if prefix else self.graphs
        key = (batch, width, span)
        if key not in graphs:
            out = None
            if all_logits:  # one buffer for every verification graph: only one pass's logits are read at a time
                if self.verify_out is None:
                    self.verify_out = torch.empty(self.MAX_VERIFY_TOKENS * self.vocab_size, dtype=torch.float32,
                                                  device=self.device)
                out = self.verify_out[: batch * width * self.vocab_size].view(batch, width, self.vocab_size)
            graphs[key] = DecodeGraph(self.model, self.cache, batch, span, self.pool, width,
                                      compact=width > 1 and not prefix,
                                      vocab_size=self.vocab_size, out=out)
        return graphs[key]

    @torch.inference_mode()
    def feed_many(self, slots: Sequence[int], ids: Sequence[list[int]], all_logits: bool = False,
                  with_summary: bool = False) -> Tensor | list[Tensor] | tuple[Tensor, Tensor]:
        """See HFBatchRunner. `with_summary` returns (logits, ead.router.token_summary(logits)), the summary
        computed inside the decode graphs (one kernel launch fewer per signal, no host work)."""
        assert slots and all(ids), "feed_many needs at least one slot and one new token per slot"
        new_lengths = [self.seen[s] + len(t) for s, t in zip(slots, ids, strict=True)]
        self.cache.check_capacity(slots, new_lengths)  # host-side numbers: no device sync
        span = self.span(max(new_lengths))
        if all_logits:  # verification: every position of every row in one pass
            logits = self._catch_up(list(slots), list(ids), span, last_only=False)  # (n, T, V)
            return [logits[i, : len(t), : self.vocab_size] for i, t in enumerate(ids)]
        many = [i for i, t in enumerate(ids) if len(t) > 1]
        one = [i for i, t in enumerate(ids) if len(t) == 1]
        if many and one:
            width = _catch_up_bucket(len(ids), max(map(len, ids)))[1]
            if (_pow2(len(ids)) - _pow2(len(many))) * width <= self.MERGE_TOKENS:
                many, one = list(range(len(ids))), []  # one pass for all
        plans = [[[(i, 0, len(ids[i])) for i in many]]] if many else []  # one pass of whole rows
        if many and not self.graphed(len(many), max(len(ids[i]) for i in many)):  # too wide for one graph
            lengths = [len(ids[i]) for i in many]
            plans = [[[(many[k], start, stop) for k, start, stop in chunks] for chunks in plan]
                     for plan in self._plan(lengths)]
        parts: list[tuple[list[int], Tensor]] = []  # (input index of each row, its logits)
        for plan in plans:
            for chunks in plan:
                out = self._catch_up([slots[i] for i, _, _ in chunks], [ids[i][a:b] for i, a, b in chunks], span)
                # A row's last chunk gives its logits; rows run longest first, so those whose text ends here are
                # the pass's last ones.
                ends = [i for i, _, b in chunks if b == len(ids[i])]
                parts.append((ends, out[len(chunks) - len(ends):]))
        if one:
            parts.append((one, self._decode([slots[i] for i in one], [ids[i][0] for i in one], span)))
        logits = parts[0][1] if len(parts) == 1 else torch.cat([part for _, part in parts])
        flat = [i for rows, _ in parts for i in rows]  # input index of each row of `logits`
        if flat != list(range(len(slots))):  # back to the order of `slots`
            where = {i: p for p, i in enumerate(flat)}
            order = [where[i] for i in range(len(slots))]
            logits = logits.index_select(0, torch.tensor(order).to(self.device, non_blocking=True))
        V = self.vocab_size  # the columns after V are token_summary's
        return (logits[:, :V], logits[:, V:]) if with_summary else logits[:, :V]

    def graphed(self, n: int, width: int, all_logits: bool = False) -> bool:
        """Whether a catch-up (`all_logits`: a verification) of n rows of at most `width` tokens replays a graph;
        if not, it runs eagerly, padded to its longest row."""
        buckets = self._verify_buckets() if all_logits else self._catch_up_buckets()
        return self.use_graphs and _catch_up_bucket(n, width) in buckets

    def _plan(self, lengths: list[int]) -> list[list[list[tuple[int, int, int]]]]:
        """The passes of a catch-up too wide for one graph (rows bringing `lengths` tokens): groups of rows by
        length (`_split`), each run eagerly as one pass, or, where that costs less, in chunks through graphs; or
        all rows in chunks, if that costs less still. A group's plan is a list of passes, each pass a list of (row
        index, first token, end) longest row first; an eager group's one pass takes every row whole.

        Chunked, a group of n rows feeds its first W tokens a row, then the next W, and so on (the most a graph
        of pow2(n) rows takes, at most MAX_CHUNK_PASSES passes), each pass a graph replay (`_chunked`, `_chunks`).
        Costs, in padded tokens: max(MERGE_TOKENS, tokens) a pass; an eager pass at least what its launches cost,
        which the host issues one by one while the device computes (`calibrate_eager`; EAGER_TOKENS where there
        are no graphs). On an H100 host the 1.5B shape's eager catch-up of a row of about 300 tokens took 22-66 ms,
        its two graphs 7.2 ms (BENCHMARKS.md, session 8): such catch-ups come from rows that rode a long phase of
        large rounds."""
        groups, plans, cost = self._split(lengths), [], 0
        for group in groups:
            eager = max(self.MERGE_TOKENS, len(group) * lengths[group[0]], self.calibrate_eager())
            chunked, padded = self._chunked(group, lengths)
            plans.append(chunked if padded < eager else [[(i, 0, lengths[i]) for i in group]])
            cost += min(padded, eager)
        if len(groups) == 1:
            return plans
        # `_split` groups rows for eager passes; graphs may prefer them together (two rows of 300 tokens: two
        # passes of 2 x 256 and 2 x 64, not four of one row).
        together, padded = self._chunked([i for group in groups for i in group], lengths)
        return [together] if padded < cost else plans

    def _chunked(self, group: list[int], lengths: list[int]) -> tuple[list[list[tuple[int, int, int]]], float]:
        """The cheapest way to feed `group` (longest first) in chunks through graphs, and its cost in padded
        tokens (inf if none: without graphs, or past MAX_CHUNK_PASSES passes): the group whole, or cut into
        pieces of power-of-two row counts (9 rows: 8 and 1), the longest rows in the largest."""
        options = [[group]]
        if len(group) != _pow2(len(group)):
            sizes = [1 << bit for bit in reversed(range(len(group).bit_length())) if len(group) >> bit & 1]
            starts = [sum(sizes[:k]) for k in range(len(sizes))]
            options.append([group[a:a + n] for a, n in zip(starts, sizes)])
        best, cost = [], math.inf
        for option in options if self.use_graphs or self.chunk_eager else []:
            pieces = [self._chunks(rows, lengths) for rows in option]
            if any(p is None for p in pieces):
                continue
            passes = [chunks for piece in pieces for chunks in piece]
            padded = sum(self._padded(c) for c in passes)
            if padded < cost:
                best, cost = passes, padded
        return best, cost

    def _chunks(self, rows: list[int], lengths: list[int]) -> list[list[tuple[int, int, int]]] | None:
        """`rows` (longest first) fed in chunks of W tokens through graphs of pow2(len(rows)) rows: pass k feeds
        tokens kW..(k+1)W of every row that has them. W is the power of two, no wider than those graphs take,
        that pads the fewest tokens in at most MAX_CHUNK_PASSES passes (rows of 150 tokens: 128 and 32, not 256);
        None if no W fits (a long prompt: its compute outweighs the launches an eager pass costs)."""
        best, cost, n = None, math.inf, _pow2(len(rows))
        width = min(self.MAX_GRAPH_WIDTH, self.MAX_GRAPH_TOKENS // n)
        while width >= 2 and -(-lengths[rows[0]] // width) <= self.MAX_CHUNK_PASSES:
            passes = [[(i, k * width, min(lengths[i], (k + 1) * width)) for i in rows if lengths[i] > k * width]
                      for k in range(-(-lengths[rows[0]] // width))]
            padded = sum(self._padded(c) for c in passes)
            if padded < cost:
                best, cost = passes, padded
            width //= 2
        return best

    def _padded(self, chunks: list[tuple[int, int, int]]) -> int:
        """What a graphed pass of these (row, first, end) chunks costs, in padded tokens (`_plan`)."""
        return max(self.MERGE_TOKENS, _pow2(len(chunks)) * max(2, _pow2(max(b - a for _, a, b in chunks))))

    def _split(self, lengths: list[int]) -> list[list[int]]:
        """Indices of `lengths` (the tokens each row of an eager catch-up brings) grouped into passes, longest
        rows first. A pass pads its rows to its longest, and costs about one read of the weights up to
        MERGE_TOKENS padded tokens, more beyond: the grouping, of rows adjacent in length order, minimises the
        sum over passes of max(MERGE_TOKENS, rows x longest) (dynamic programming, O(rows^2))."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        n, floor = len(order), self.MERGE_TOKENS
        best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)  # best[j]: the cost of the first j rows; cut: their last pass
        for j in range(1, n + 1):
            for i in range(j):  # the last pass holds order[i:j], whose longest row is order[i]
                cost = best[i] + max(floor, (j - i) * lengths[order[i]])
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        groups, j = [], n
        while j:
            groups.append(order[cut[j]: j])
            j = cut[j]
        return groups[::-1]

    def _catch_up(self, slots: list[int], ids: list[list[int]], span: int, last_only: bool = True) -> Tensor:
        """Every token of `ids[i]` into slot `slots[i]`, the rows gathered into one padded pass. Returns the
        logits after each row's last token, (n, V), or with `last_only=False` after every token, (n, T, V)."""
        n, width = len(slots), max(len(t) for t in ids)
        graphed = self.graphed(n, width, all_logits=not last_only)
        batch, width = _catch_up_bucket(n, width) if graphed else (n, width)
        if graphed and last_only and width <= self.MAX_PREFIX_WIDTH and self.decode_rows(slots) == batch:
            return self._catch_up_prefix(slots, ids, span, batch, width)
        # One host-to-device copy: token ids and positions (batch * width each), valid lengths, cache rows;
        # pad rows are idle (valid 0) in row 0. Built as lists: element-wise tensor writes cost microseconds.
        tokens, positions, valid, rows = [], [], [0] * batch, [0] * batch
        for b in range(batch):
            t = ids[b] if b < n else []
            start = self.seen[slots[b]] if b < n else 0
            tokens += t + [0] * (width - len(t))
            positions += range(start, start + width)
            if b < n:
                valid[b], rows[b] = len(t), slots[b]
                self.seen[slots[b]] += len(t)
        host = torch.tensor(tokens + positions + valid + rows, dtype=torch.int64).to(self.device, non_blocking=True)
        tokens_d, positions_d = host[: batch * width].view(batch, width), host[batch * width: 2 * batch * width]
        valid_d, rows_d = host[2 * batch * width: 2 * batch * width + batch], host[2 * batch * width + batch:]
        positions_d = positions_d.view(batch, width)
        if graphed:  # cloned: a later replay of another graph of the same memory pool may reuse this output
            graph = self._graph(batch, width, span, all_logits=not last_only)
            return graph.run_rows(tokens_d, positions_d, valid_d, rows_d)[:n].clone()
        logits = self.model(tokens_d, positions_d, self.cache, valid_d, last_only=last_only, kv_len=span,
                            rows=rows_d, kernels=EAGER).float()
        return self._with_summary(logits) if last_only else logits

    def _catch_up_prefix(self, slots: list[int], ids: list[list[int]], span: int, batch: int, width: int) -> Tensor:
        """`_catch_up` of rows that lie in cache rows 0..batch-1 (batch the pass's row bucket), as a decode does:
        batch row b is cache row b, the other rows idle, so attention reads the cache in place; a compact pass
        copies its rows' keys and values out of the cache in every layer first. On an H100 those copies took 3.1
        of a 16-row, 2-token pass's 15.9 ms on the 14B shape (11.4 for a decode; BENCHMARKS.md, session 8): a
        large round after a small one carries every row, one or two tokens each, and ran that pass."""
        where = {slot: i for i, slot in enumerate(slots)}
        tokens, positions, valid = [], [], [0] * batch
        for b in range(batch):
            t = ids[where[b]] if b in where else []
            start = self.seen[b] if b in where else 0
            tokens += t + [0] * (width - len(t))
            positions += range(start, start + width)
            if b in where:
                valid[b] = len(t)
                self.seen[b] += len(t)
        host = torch.tensor(tokens + positions + valid + list(slots), dtype=torch.int64).to(self.device,
                                                                                         non_blocking=True)
        tokens_d, positions_d = host[: batch * width].view(batch, width), host[batch * width: 2 * batch * width]
        valid_d, index = host[2 * batch * width: 2 * batch * width + batch], host[2 * batch * width + batch:]
        graph = self._graph(batch, width, span, prefix=True)
        return graph.run_rows(tokens_d, positions_d.view(batch, width), valid_d).index_select(0, index)

    @torch.inference_mode()
    def decode_from_device(self, slots: Sequence[int], tokens: Tensor) -> tuple[Tensor, Tensor]:
        """One token into each of `slots`, the tokens given on the device and not known to the host: (n,) ids,
        int64 or float32 (a summary's last column), in the order of `slots`. The engine's lookahead feeds a round's
        greedy tokens this way before it reads them. Returns (logits, summary) as feed_many(..., with_summary=True);
        `seen` advances by one per slot, as for any decode."""
        assert slots and tokens.shape == (len(slots),), f"one token per slot: {len(slots)} slots, {tokens.shape}"
        new_lengths = [self.seen[s] + 1 for s in slots]
        self.cache.check_capacity(slots, new_lengths)  # host-side numbers: no device sync
        logits = self._decode(list(slots), tokens, self.span(max(new_lengths)))
        return logits[:, : self.vocab_size], logits[:, self.vocab_size:]

    def decode_rows(self, slots: Sequence[int]) -> int:
        """B, the cache rows 0..B-1 a decode of `slots` runs over: the smallest batch bucket holding them."""
        return min(self.max_batch, _pow2(max(slots) + 1))

    def _decode(self, slots: list[int], tokens: list[int] | Tensor, span: int) -> Tensor:
        """One token into each of `slots`, over cache rows 0..B-1: ids from the host, or (n,) on the device."""
        batch = self.decode_rows(slots)
        on_device = isinstance(tokens, Tensor)
        host = [0] * (4 * batch)  # tokens, positions, valid, then the slots to read logits from
        for i, s in enumerate(slots):
            t = 0 if on_device else tokens[i]  # device tokens are written in after the copy
            host[s], host[batch + s], host[2 * batch + s], host[3 * batch + i] = t, self.seen[s], 1, s
            self.seen[s] += 1
        tokens_d, positions, valid, index = torch.tensor(host, dtype=torch.int64).to(
            self.device, non_blocking=True).view(4, batch)
        if on_device:  # the index row lists the slots in the order of `tokens`
            tokens_d.index_copy_(0, index[: len(slots)], tokens.to(torch.int64))
        if self.use_graphs:
            logits = self._graph(batch, 1, span).run_rows(tokens_d, positions, valid)
        else:
            logits = self._with_summary(self.model(tokens_d[:, None], positions[:, None], self.cache, valid,
                                                   last_only=True, kv_len=span, kernels=EAGER).float())
        return logits.index_select(0, index[: len(slots)])

    def _with_summary(self, logits: Tensor) -> Tensor:
        """Eager passes' logits in the graphs' layout: (n, vocab + 5), token_summary's columns last."""
        return logits_with_summary(logits, self.vocab_size)


def _catch_up_bucket(n: int, width: int) -> tuple[int, int]:
    """The padded (rows, width) of a catch-up of n rows of at most `width` tokens."""
    return _pow2(n), max(2, _pow2(width))


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def resolve_max_seq_tokens(asked: int | None, limit: int, default: int) -> int:
    """The tokens a runner holds: `asked`, or `default` when None; more than the model's `limit` positions
    is refused, since rotary positions past the trained range give a model no meaning."""
    if asked is None:
        return default
    if asked > limit:
        raise ConfigError(f"max_seq_tokens={asked} exceeds the model's max_position_embeddings={limit}; "
                          f"use at most {limit}")
    return asked


def choose_backend(models: Sequence[PreTrainedModel], backend: str, device: torch.device) -> str:
    """'hf' or 'native' for EngineConfig.backend. "auto" picks native on CUDA when every model is one the
    native decoder implements; on CPU it keeps transformers, the reference of the test suite. A model that
    auto cannot run natively gets a warning naming its model_type and the reason, and hf for both.
    'llamacpp' goes with GGUF handles from `load_pair(..., backend="llamacpp" or "auto")`, and only with them."""
    if backend == "llamacpp" or any(is_llamacpp_model(m) for m in models):
        if backend not in ("auto", "llamacpp") or not all(is_llamacpp_model(m) for m in models):
            raise ConfigError(f"backend {backend!r} needs the pair loaded for it: pass the same backend to "
                              "load_pair (backend 'llamacpp' runs .gguf files loaded by llama.cpp)")
        return "llamacpp"
    if all(isinstance(m, Transformer) for m in models):  # ead's decoder built directly (benchmarks)
        return "native"
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "hf"
    for m in models:
        try:
            ModelArgs.from_hf_config(m.config)
        except ModelLoadError as e:
            warnings.warn(f"backend 'auto' falls back to 'hf' (transformers, eager, slow on a GPU): model_type "
                          f"{getattr(m.config, 'model_type', None)!r} has no native decoder: {e}", stacklevel=3)
            return "hf"
    return "native"


def build_batch_runner(model: PreTrainedModel, vocab_size: int, backend: str, cfg: EngineConfig,
                       max_batch: int) -> HFBatchRunner | NativeBatchRunner:
    """The batched runner (`max_batch` slots) for one model of the pair; see HFBatchRunner for the interface."""
    if backend == "llamacpp":
        return LlamaCppBatchRunner(model, vocab_size, cfg.max_seq_tokens, max_batch)
    if backend == "native":
        if isinstance(model, Transformer):  # ead's own decoder, already built (benchmarks with random weights)
            return NativeBatchRunner(model, vocab_size, cfg.max_seq_tokens, cfg.cuda_graphs, max_batch,
                                     cfg.fused_kernels)
        return NativeBatchRunner.from_hf(model, vocab_size, cfg.max_seq_tokens, cfg.cuda_graphs, max_batch,
                                         cfg.fused_kernels)
    return HFBatchRunner(model, vocab_size, cfg.max_seq_tokens, max_batch)
