"""The decoder: a Llama-family transformer (Llama, Qwen2, Qwen3, Mistral) from token ids to logits.

It owns the math: embeddings, RMSNorm, grouped-query attention with rotary positions, SwiGLU MLP and the
output head, reproducing transformers' logits. Checkpoint names live in loader.py, the cache layout in
kv_cache.py, sampling and the choice of model elsewhere. `forward` allocates no cache memory, takes
positions as tensors and never branches on tensor values, so decode can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ead.errors import ModelLoadError
from ead.models.kv_cache import KVCache
from ead.router import logits_with_summary

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x ("llama3") rope scaling: wavelengths longer than original_max_position_embeddings /
    low_freq_factor are stretched by `factor`, those shorter than ... / high_freq_factor are kept."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelArgs:
    """Shape and numerics of one decoder; `dim` is the hidden size, `head_dim` may differ from dim // n_heads."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelArgs:
        """Read a transformers config of model_type llama, qwen2, qwen3 or mistral.

        Attention is always full (causal over the whole prefix). A Mistral or Qwen config with a sliding
        window therefore matches transformers only while sequences stay within `sliding_window` tokens;
        Mistral 7B v0.2+ and the Qwen2.5/Qwen3 releases set no window.
        """
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(f"model_type {model_type!r} is not supported; ead's decoder runs "
                                 f"{', '.join(SUPPORTED_MODEL_TYPES)}. Choose a model of one of these families.")
        unsupported = {"hidden_act": config.hidden_act != "silu", "mlp_bias": getattr(config, "mlp_bias", False),
                       "attention_bias": getattr(config, "attention_bias", False)}
        if any(unsupported.values()):
            settings = ", ".join(f"{k}={getattr(config, k)!r}" for k, bad in unsupported.items() if bad)
            raise ModelLoadError(f"{model_type} config with {settings} is not supported; ead's decoder expects "
                                 "SiLU and bias-free projections (apart from Qwen2's q/k/v biases).")
        # transformers 5 keeps rope_theta and any scaling in one dict, `rope_parameters`, and folds the
        # older `rope_theta` / `rope_scaling` attributes into it; read those only as a fallback.
        rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))  # None for a per-layer-type dict
        if theta is None or rope_type not in ("default", "llama3") or rope.get("partial_rotary_factor", 1.0) != 1:
            raise ModelLoadError(f"rope {rope!r} is not supported; ead implements the default rope and "
                                 "Llama 3.x 'llama3' scaling, one for all layers, over the full head dim.")
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                                  float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
        return cls(
            vocab_size=config.vocab_size, dim=config.hidden_size, n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            intermediate_size=config.intermediate_size, norm_eps=config.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=scaling, qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(config.tie_word_embeddings),
            max_position_embeddings=config.max_position_embeddings)


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Rotary inverse frequencies, radians per position: (head_dim // 2,) float32 on CPU."""
    # float32 with an int64 arange, as transformers computes them, so both round alike.
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim)
    s = args.rope_scaling
    if s is None:
        return inv_freq
    # llama3: keep short wavelengths, divide long ones by `factor`, blend linearly in between; the clamp
    # folds the three bands of Meta's reference code into one expression.
    wavelen = 2 * math.pi / inv_freq
    lo, hi = s.low_freq_factor, s.high_freq_factor
    smooth = ((s.original_max_position_embeddings / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / s.factor + smooth * inv_freq


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, T, H, D) by (B, T, 1, D) angles. HF checkpoints pair dim i with dim i + D/2 (not 2i, 2i+1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim. Normalised in float32 and cast back before the weight, as transformers
    does, so bf16 rounds alike."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual add and the next RMSNorm: (x + delta, rms_norm(x + delta)), the sum in x's dtype."""
    h = x + delta
    return h, rms_norm(h, weight, eps)


def rope_store(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
               rows: Tensor, slots: Tensor) -> Tensor:
    """Rotate q and k, write k and v into the cache at (rows, slots), return the rotated q."""
    k = apply_rope(k, cos, sin)
    # Advanced indices split by a slice put their (B, T) dims first: k_cache[rows, :, slots] is (B, T, Hkv, D).
    k_cache[rows, :, slots] = k
    v_cache[rows, :, slots] = v
    return apply_rope(q, cos, sin)


def silu_mul(gate_up: Tensor) -> Tensor:
    """SwiGLU's activation on the fused gate and up projections: silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def step_inputs(positions: Tensor, valid_lengths: Tensor, inv_freq: Tensor, trash_slot: int, n_slots: int,
                dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What every layer of one forward shares: (cache slots written, additive attention mask in `dtype`
    (0 = attend, -inf = not), cos, sin). An additive mask saves SDPA converting a bool one in every layer."""
    T = positions.shape[1]
    is_real = torch.arange(T, device=positions.device) < valid_lengths[:, None]  # (B, T)
    slots = torch.where(is_real, positions, trash_slot)  # (B, T): where each token's k/v goes
    sees = attention_mask(positions, is_real, n_slots)
    mask = torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill(~sees, -math.inf)
    freqs = positions[..., None].float() * inv_freq.float()  # (B, T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, T, 1, D), broadcast over heads
    return slots, mask, angles.cos().to(dtype), angles.sin().to(dtype)


def attend(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, folded: bool) -> Tensor:
    """SDPA of (B, H, T, D) queries over (B, H_kv, L, D) keys and values: (B, H, T, D).

    `folded` False: `mask` is the additive (B, 1, T, L) mask and SDPA takes the grouped heads as they are.
    `folded` (on CUDA): `mask` is `fold_mask`'s (B, 1, G * T, L), and the G query heads of each key/value head
    attend as G * T queries of that one head, under the memory-efficient kernel. With a mask and grouped heads
    SDPA picks cuDNN, which builds an execution plan for every new (rows, tokens, keys) shape: on an H100, a
    13-row, 67-token eager catch-up of the 1.5B shape took 139 ms the first time and 34 ms the next, 10.6 ms of it
    on the GPU, most of the rest in cuDNN's host code. Eager catch-ups bring a new shape almost every time; the
    memory-efficient kernel needs no plan, but takes no grouped heads. Repeating the keys and values to every
    query head (session 6) copied G times the attended cache in every layer: 1.56 ms a layer for 48 rows x 200
    tokens over 512 keys of the 14B shape, 0.98 ms folded, 0.42 ms cuDNN's (BENCHMARKS.md). Folding copies only
    the queries, and the mask once per forward pass. Captured graphs take the same path: a plan built during a
    capture breaks it, and the warm-up before a capture must run what the capture records."""
    if not folded:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    B, H, T, D = q.shape
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        y = F.scaled_dot_product_attention(q.reshape(B, keys.shape[1], -1, D), keys, values, attn_mask=mask)
    return y.reshape(B, H, T, D)  # row g * T + t of key/value head j was query head j * G + g, token t


def fold_mask(mask: Tensor, groups: int) -> Tensor:
    """The (B, 1, T, L) additive mask for `attend(folded=True)` with `groups` query heads per key/value head:
    (B, 1, groups * T, L), row g * T + t being row t."""
    B, _, T, L = mask.shape
    return mask[:, :, None].expand(B, 1, groups, T, L).reshape(B, 1, groups * T, L)


class Kernels:
    """The elementwise parts of a step, apart from the matrix products. Eager, a decode step of one layer is
    about 40 small kernels, each a few microseconds, and at batch 1 they cost more than reading the weights;
    `Kernels.compiled(device)` runs each function as one or two torch.compile'd (Triton) kernels, leaving the
    matrix products to cuBLAS. `decode_attention` (None: SDPA) attends one query per row over each row's own
    keys (see attention_kernel.py); `compiled` sets it on CUDA where triton imports."""

    def __init__(self, wrap=lambda fn: fn, decode_attention: Callable[..., Tensor] | None = None) -> None:
        self.rms_norm, self.add_rms_norm, self.rope_store = wrap(rms_norm), wrap(add_rms_norm), wrap(rope_store)
        self.silu_mul, self.step_inputs = wrap(silu_mul), wrap(step_inputs)
        self.with_summary = wrap(logits_with_summary)  # a decode graph's last step (ead.models.graphs)
        self.decode_attention = decode_attention

    @classmethod
    def compiled(cls, device: torch.device | str = "cuda") -> Kernels:
        # Batch and width 1 are specialised apart from larger sizes, so each function compiles a few times
        # (decode, catch-up, prefill; batch 1 and more); the default limit of 8 per function is too tight.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        decode_attention = None
        if torch.device(device).type == "cuda":
            try:  # triton comes with CUDA builds of torch; without it decode keeps SDPA
                from ead.models.attention_kernel import decode_attention
            except ImportError:
                pass
        return cls(lambda fn: torch.compile(fn, fullgraph=True, dynamic=True), decode_attention)


EAGER = Kernels()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # q, k and v in one matmul: one kernel launch instead of three per layer and decode step.
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, k_cache: Tensor, v_cache: Tensor,
                rows: Tensor, slots: Tensor, kernels: Kernels = EAGER, compact: bool = False) -> Tensor:
        """x: (B, T, dim); mask: (B, 1, T, L) additive (0 or -inf), L <= S+1 the slots attended (on CUDA folded,
        (B, 1, G * T, L): see `attend`); k_cache, v_cache:
        (max_batch, Hkv, S+1, D), written in place at (rows, slots), both (B, T)-broadcastable; batch row b
        is cache row rows[b] (`compact`: gathered for attention) or else cache row b. Returns (B, T, dim).
        Decode (T == 1) with `kernels.decode_attention` reads no mask: row b attends slots 0..slots[b] (slot 0
        alone for a pad, whose slot is the trash slot), which is what the mask says, within the L slots."""
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3 normalises each head before rope
            q = kernels.rms_norm(q, self.q_norm.weight, self.q_norm.eps)
            k = kernels.rms_norm(k, self.k_norm.weight, self.k_norm.eps)
        q = kernels.rope_store(q, k, v, cos, sin, k_cache, v_cache, rows, slots)
        L = mask.shape[-1]
        if T == 1 and kernels.decode_attention is not None:  # each row's keys end at its new key's slot: no mask
            y = kernels.decode_attention(q, k_cache, v_cache, rows[:, 0], slots[:, 0], L)  # (B, 1, H, D)
            return self.wo(y.reshape(B, 1, -1))
        # Attend over the first L slots of the B rows (views, no copy); the mask keeps each row to its prefix.
        if compact:  # a few rows from anywhere in the cache: copy their first L slots
            keys, values = k_cache[:, :, :L].index_select(0, rows[:, 0]), v_cache[:, :, :L].index_select(0, rows[:, 0])
        else:  # rows 0..B-1: views, no copy
            keys, values = k_cache[:B, :, :L], v_cache[:B, :, :L]
        y = attend(q.transpose(1, 2), keys, values, mask, folded=keys.is_cuda)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # gate and up fused, as wqkv
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor, kernels: Kernels = EAGER) -> Tensor:
        return self.w2(kernels.silu_mul(self.w13(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MLP(args)

    def forward(self, x: Tensor, delta: Tensor | None, cos: Tensor, sin: Tensor, mask: Tensor, k_cache: Tensor,
                v_cache: Tensor, rows: Tensor, slots: Tensor, kernels: Kernels = EAGER,
                compact: bool = False) -> tuple[Tensor, Tensor]:
        """The residual stream is x + delta (delta None: x alone). Returns the next (x, delta): the previous
        layer's last residual add is done here, fused with this layer's first norm."""
        eps = self.attention_norm.eps
        if delta is None:
            normed = kernels.rms_norm(x, self.attention_norm.weight, eps)
        else:
            x, normed = kernels.add_rms_norm(x, delta, self.attention_norm.weight, eps)
        a = self.attention(normed, cos, sin, mask, k_cache, v_cache, rows, slots, kernels, compact)
        h, normed = kernels.add_rms_norm(x, a, self.ffn_norm.weight, eps)
        return h, self.feed_forward(normed, kernels)


def attention_mask(positions: Tensor, is_real: Tensor, n_slots: int) -> Tensor:
    """Which cache slots each query sees: (B, 1, T, n_slots) bool, True = attend.

    A real query at position p sees slots 0..p of its row: its cached prefix plus, causally, this call's new
    tokens, which are written before attention. Positions alone suffice because a row's real tokens sit at
    cache.lengths[b] + 0, 1, ...; slots past them hold stale keys of a reset row or pads, never seen.
    A padding query sees only slot 0 (finite: zeros or an old key), so no softmax row is empty and none
    turns NaN, even in an idle row that holds no token yet; its output is discarded.
    """
    slot = torch.arange(n_slots, device=positions.device)
    sees = torch.where(is_real[..., None], slot <= positions[..., None], slot == 0)  # (B, T, n_slots)
    return sees[:, None]  # (B, 1, T, n_slots): one mask shared by all heads


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Kept float32 whatever the weights' dtype (load_native builds it so): bf16 angles drift at long positions.
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.kernels = EAGER

    def fuse(self) -> Transformer:
        """Run the elementwise parts of every step as compiled kernels and decode attention as a Triton kernel
        (see Kernels); for CUDA. The first calls of each shape family compile (seconds, cached on disk by torch
        and triton afterwards)."""
        self.kernels = Kernels.compiled(self.inv_freq.device)
        return self

    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache, valid_lengths: Tensor | None = None,
                last_only: bool = False, kv_len: int | None = None, rows: Tensor | None = None,
                kernels: Kernels | None = None) -> Tensor:
        """Logits for T new tokens per row; writes their keys/values and advances `cache.lengths[:B]`.

        tokens, positions: (B, T) int64; batch row b is cache row b. Row b's first valid_lengths[b] tokens
        are real, at positions cache.lengths[b] + 0, 1, ... (`cache.next_positions(B, T)`); the rest are right
        padding, whose ids and positions are ignored: their keys and values go to the trash slot and their
        outputs are finite garbage. valid_lengths: (B,) int64 in 0..T, None when all T are real; 0 leaves a row
        idle. Call `cache.check_capacity` first. Returns (B, T, V) logits in the weights' dtype, or with
        `last_only` (B, V) at each row's last valid token (catch-up needs no more).
        `kv_len` (a Python int, default all S+1 slots) bounds the slots attention reads: it must exceed every
        real position of the call. Decode reads the whole attended span of every row, so a short span for
        short sequences saves reading keys and values that the mask would hide anyway.
        `rows` (B,) int64 puts batch row b in cache row rows[b] (default: b), so a catch-up of a few rows
        computes only those; pads of such a batch (valid 0) may repeat any row. `kernels` overrides
        `self.kernels` for this call (eager passes run EAGER: compiled functions called one by one pay a guard
        check each, which only a captured graph hides).
        """
        B, T = tokens.shape
        kernels = kernels or self.kernels
        if valid_lengths is None:
            valid_lengths = torch.full((B,), T, dtype=torch.int64, device=tokens.device)
        x = self.tok_embeddings(tokens)  # (B, T, dim)
        slots, mask, cos, sin = kernels.step_inputs(positions, valid_lengths, self.inv_freq, cache.trash_slot,
                                                    kv_len or cache.trash_slot + 1, x.dtype)
        if x.is_cuda and not (T == 1 and kernels.decode_attention is not None):  # attention through `attend`
            mask = fold_mask(mask, self.args.n_heads // self.args.n_kv_heads)
        compact = rows is not None
        batch_rows = torch.arange(B, device=tokens.device)
        cache_rows = (rows if compact else batch_rows)[:, None]  # (B, 1), broadcast against slots
        delta = None
        for i, layer in enumerate(self.layers):
            x, delta = layer(x, delta, cos, sin, mask, cache.k[i], cache.v[i], cache_rows, slots, kernels, compact)
        if compact:
            cache.lengths.index_add_(0, rows, valid_lengths)
        else:
            cache.lengths[:B] += valid_lengths

        if last_only:  # an idle row reads its position 0: garbage, but no out-of-range index
            index = (batch_rows, (valid_lengths - 1).clamp(min=0))
            x, delta = x[index][:, None], delta[index][:, None]  # (B, 1, dim): one rank for every call
        _, h = kernels.add_rms_norm(x, delta, self.norm.weight, self.norm.eps)
        logits = self.output(h)
        return logits[:, 0] if last_only else logits
