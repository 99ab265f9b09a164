"""Tensor parallelism for the native decoder: one model split over `world` processes, one per GPU (or CPU rank).

It owns the split (Megatron style) and the few collectives it needs, and leaves the math to transformer.py:
- attention: rank r keeps q heads r*H/w .. (r+1)*H/w - 1 and kv heads r*Hkv/w .. likewise, so grouped-query
  attention stays local (q head i reads kv head i // (H/Hkv) on the same rank). Its slice of the fused wqkv is
  [q_r | k_r | v_r] (and the same slice of Qwen2's bias); wo is split by its input columns, so each rank's
  output is a partial sum, all-reduced once per layer;
- MLP: the fused w13 = [gate | up] becomes [gate_r | up_r] (column parallel), w2 is split by input columns
  (row parallel) and its output all-reduced: the second and last collective of a layer;
- embeddings, RMSNorm weights, q/k norms and rope: replicated (no collective; the embedding costs V * dim
  per rank, the price of simplicity);
- LM head: split by vocabulary rows (padded to a multiple of world), logits all-gathered, so every rank holds
  the same (..., V) logits.
An all-reduce leaves identical bits on every rank, so every rank's hidden state and logits are the same. The
tokens are still decided once, on the group's first rank, and broadcast (`decide`): samplers and routers then
never depend on that, and `check_ranks_agree` catches a rank that drifts (say, one fed other ids).

The per-rank model's `args` hold the per-rank head and MLP counts, so `KVCache.for_model(model.args, ...)` and
the runners allocate only this rank's kv heads. A 72B model whose whole fits no GPU is built from its parts
(`build_rank_model`, then only this rank's part allocated), or loaded and split (`load_sharded`). Joining the
group is `init_rank`'s job, starting its processes `ead.launch`'s, choosing what to generate the engine's.
Decode graphs capture the collectives with the rest of a step (NCCL supports CUDA graph capture).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ead.errors import ConfigError, RankDivergenceError
from ead.models.kv_cache import KVCache
from ead.models.loader import load_native
from ead.models.transformer import (
    EAGER,
    MLP,
    Attention,
    Kernels,
    ModelArgs,
    Transformer,
    rope_inv_freq,
)

# NVLink SHARP (multicast) is off on the machines we run on; NCCL and torch's symmetric memory must not try it.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def init_rank(rank: int, world: int, port: int | None = None, backend: str | None = None, host: str = "127.0.0.1",
              local_rank: int | None = None) -> torch.device:
    """Join the default process group as `rank` of `world` (every rank calls this with the same port) and return
    this rank's device: cuda:local_rank (default: rank) with NCCL when CUDA is there (backend None), else the CPU
    with gloo. `port` None reads the rendezvous from the environment (torchrun's MASTER_ADDR and MASTER_PORT:
    torchrun's own store already listens on that port, so a tcp:// rendezvous there would collide)."""
    for name, value in MULTICAST_OFF.items():
        os.environ.setdefault(name, value)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = rank if local_rank is None else local_rank
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_method = "env://" if port is None else f"tcp://{host}:{port}"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None)
    return device


def rank_device() -> torch.device:
    """This rank's device, as `init_rank` chose it: its GPU in an NCCL group, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(x: Tensor, world: int, group: dist.ProcessGroup | None) -> Tensor:
    """Sum `x` over the group in place (a no-op for one rank, so world 1 needs no process group)."""
    if world > 1:
        dist.all_reduce(x, group=group)
    return x


class ParallelAttention(Attention):
    """This rank's heads of one attention layer; its wo holds the matching input columns, so the output is a
    partial sum over heads, all-reduced here (wo has no bias, which would otherwise be added `world` times)."""

    def __init__(self, args: ModelArgs, world: int, group: dist.ProcessGroup | None) -> None:
        super().__init__(args)  # args: per rank
        self.world, self.group = world, group

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, k_cache: Tensor, v_cache: Tensor,
                rows: Tensor, slots: Tensor, kernels: Kernels = EAGER, compact: bool = False) -> Tensor:
        y = super().forward(x, cos, sin, mask, k_cache, v_cache, rows, slots, kernels, compact)  # (B, T, dim)
        return all_reduce(y, self.world, self.group)


class ParallelMLP(MLP):
    """This rank's slice of the intermediate features: silu(gate_r) * up_r needs no other rank's features, and
    w2's input columns r give a partial sum, all-reduced here."""

    def __init__(self, args: ModelArgs, world: int, group: dist.ProcessGroup | None) -> None:
        super().__init__(args)
        self.world, self.group = world, group

    def forward(self, x: Tensor, kernels: Kernels = EAGER) -> Tensor:
        return all_reduce(super().forward(x, kernels), self.world, self.group)


class ParallelHead(nn.Module):
    """The LM head's vocabulary rows r*Vr .. (r+1)*Vr - 1 (Vr = ceil(V / world), rows past V zero), with every
    rank's logits all-gathered: (..., dim) -> (..., V) on every rank."""

    def __init__(self, dim: int, vocab_size: int, world: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.vocab_size, self.world, self.group = vocab_size, world, group
        self.weight = nn.Parameter(torch.empty(-(-vocab_size // world), dim))

    def forward(self, h: Tensor) -> Tensor:
        local = F.linear(h, self.weight)  # (..., Vr)
        if self.world == 1:
            return local[..., : self.vocab_size]
        # One collective into one tensor (no list of outputs to copy back), which a CUDA graph captures cleanly.
        local = local.contiguous()
        parts = local.new_empty((self.world * local.shape[0], *local.shape[1:]))  # ranks' parts along dim 0
        all_gather_into(parts, local, group=self.group)
        parts = parts.view(self.world, *local.shape).movedim(0, -2)  # (..., world, Vr)
        return parts.flatten(-2)[..., : self.vocab_size]  # (..., world * Vr) -> (..., V)


# torch 2.13 renamed all_gather_into_tensor to all_gather_single (same arguments) and deprecated the old name.
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def rank_args(args: ModelArgs, world: int) -> ModelArgs:
    """The shape of one rank's model: H/w q heads, Hkv/w kv heads, intermediate/w features; the rest unchanged.
    Raises ConfigError when a count does not divide."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"the tensor-parallel size must be an integer >= 1, got {world!r}")
    counts = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "intermediate_size": args.intermediate_size}
    bad = [f"{name}={n}" for name, n in counts.items() if n % world]
    if bad:
        raise ConfigError(f"tensor parallelism over {world} ranks splits attention heads and MLP features evenly, "
                          f"but the model has {', '.join(bad)}, not divisible by {world} (n_heads={args.n_heads}, "
                          f"n_kv_heads={args.n_kv_heads}); choose a tensor-parallel size that divides them.")
    return replace(args, **{name: n // world for name, n in counts.items()})


def shard_state_dict(state: dict[str, Tensor], args: ModelArgs, rank: int, world: int) -> dict[str, Tensor]:
    """Rank `rank`'s slice of a full `Transformer` state dict (our names). Replicated tensors are shared, not
    copied; the fused wqkv / w13 slices are new tensors."""
    hq, hkv = args.n_heads * args.head_dim // world, args.n_kv_heads * args.head_dim // world  # per-rank widths
    q_dim, kv_dim, ffn = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.intermediate_size
    f = ffn // world

    def rows(t: Tensor, *spans: tuple[int, int]) -> Tensor:  # (start, width) ranges of dim 0, concatenated
        return torch.cat([t[start: start + width] for start, width in spans]).contiguous()

    out = {}
    for name, t in state.items():
        if name.endswith(("attention.wqkv.weight", "attention.wqkv.bias")):  # [q | k | v]
            out[name] = rows(t, (rank * hq, hq), (q_dim + rank * hkv, hkv), (q_dim + kv_dim + rank * hkv, hkv))
        elif name.endswith("attention.wo.weight"):  # (dim, H*D): this rank's heads' input columns
            out[name] = t[:, rank * hq: (rank + 1) * hq].contiguous()
        elif name.endswith("feed_forward.w13.weight"):  # [gate | up]
            out[name] = rows(t, (rank * f, f), (ffn + rank * f, f))
        elif name.endswith("feed_forward.w2.weight"):  # (dim, ffn)
            out[name] = t[:, rank * f: (rank + 1) * f].contiguous()
        elif name == "output.weight":  # vocabulary rows, zero-padded to Vr per rank
            vr = -(-args.vocab_size // world)
            part = t[rank * vr: (rank + 1) * vr]
            out[name] = torch.cat([part, part.new_zeros(vr - part.shape[0], part.shape[1])]) if part.shape[0] < vr \
                else part
        else:  # embeddings, norms, q/k norms
            out[name] = t
    return out


def shard(model: Transformer, rank: int, world: int, group: dist.ProcessGroup | None = None) -> Transformer:
    """The part of `model` that rank `rank` of `world` runs, on the model's device and in its dtype, in eval mode.

    Every rank of `group` (default: the whole default group, whose size must be `world`) calls this with its own
    rank, then calls the result with the same inputs at the same time: each forward all-reduces twice per layer
    and all-gathers the logits once. `world` 1 returns an equivalent model that runs no collective.
    Its `args` are per rank (heads and MLP width divided by `world`), so `KVCache.for_model(sharded.args, ...)`
    holds only this rank's kv heads. Raises ConfigError when the heads or MLP width do not divide by `world`.
    """
    args = rank_args(model.args, world)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ConfigError(f"rank {rank!r} is outside 0..{world - 1} for a tensor-parallel size of {world}")
    if world > 1 and dist.is_initialized() and dist.get_world_size(group) != world:
        raise ConfigError(f"the process group has {dist.get_world_size(group)} ranks, not world={world}; "
                          "start one process per tensor-parallel rank.")
    state = shard_state_dict(model.state_dict(), model.args, rank, world)
    sharded = build_rank_model(model.args, world, group)
    sharded.load_state_dict(state, strict=True, assign=True)
    sharded.inv_freq = rope_inv_freq(args).to(model.inv_freq.device)  # non-persistent, float32, meta until now
    sharded.kernels = model.kernels
    return sharded.eval()


def build_rank_model(args: ModelArgs, world: int, group: dist.ProcessGroup | None = None) -> Transformer:
    """The module tree of one rank's part of a model of shape `args` (the whole model's), its parameters on the
    meta device: fill them with `load_state_dict(..., assign=True)`, or allocate just this rank's share with
    `to_empty(device=...)` (a 72B model whose whole would not fit one GPU). The rope buffer is left to the caller.
    Raises ConfigError when the heads or MLP width do not divide by `world`."""
    per_rank = rank_args(args, world)
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = Transformer(per_rank)
        for layer in model.layers:
            layer.attention = ParallelAttention(per_rank, world, group)
            layer.feed_forward = ParallelMLP(per_rank, world, group)
        model.output = ParallelHead(per_rank.dim, per_rank.vocab_size, world, group)
    return model


def load_sharded(hf_model: nn.Module, device: torch.device | str, dtype: torch.dtype,
                 group: dist.ProcessGroup | None = None) -> Transformer:
    """This rank's part of a transformers model of the group, on `device`: the whole model is converted in host
    memory, split, and only this rank's part moves to `device`. Host memory holds the whole model once per rank
    while it runs (`ead.pair.load_pair` loads the ranks one after another for that reason)."""
    whole = load_native(hf_model, "cpu", dtype)
    return shard(whole, dist.get_rank(group), dist.get_world_size(group), group).to(device)


def broadcast_from_first(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Overwrite `t` on every rank with the group's first rank's `t`, in place; returns it."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.broadcast(t, group=group, group_src=0)
    return t


def decide(logits: Tensor, choose: Callable[[Tensor], Tensor], group: dist.ProcessGroup | None = None) -> Tensor:
    """The next token of each row, chosen once: `choose` ((B, V) logits -> (B,) int64 ids; the sampler, and
    whatever routes on the logits) runs on the group's first rank only, and every rank gets its ids. (B,) int64."""
    first = not dist.is_initialized() or dist.get_rank(group) == 0
    ids = choose(logits) if first else torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    return broadcast_from_first(ids.to(torch.int64).contiguous(), group)


def ids_digest(ids: Sequence[Sequence[int]]) -> int:
    """A 63-bit digest of every row's token ids (the row boundaries included)."""
    blob = ";".join(",".join(map(str, row)) for row in ids).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


def check_ranks_agree(ids: Sequence[Sequence[int]], device: torch.device | str,
                      group: dist.ProcessGroup | None = None) -> None:
    """Raise RankDivergenceError, on every rank, unless every rank of the group holds the same `ids`.
    One all-gather of an int64 per rank and one host sync: call it every few steps, not every step."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    mine = torch.tensor([ids_digest(ids)], dtype=torch.int64, device=device)
    digests = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(digests, mine, group=group)
    values = [int(d) for d in digests]
    if len(set(values)) > 1:
        lengths = [len(row) for row in ids]
        raise RankDivergenceError(
            f"tensor-parallel ranks hold different token ids (digests by rank {[hex(v) for v in values]}; this rank "
            f"{dist.get_rank(group)} has row lengths {lengths}); every rank must feed the same tokens, decided "
            "once by `decide`. A rank that samples or routes on its own causes this.")


@torch.inference_mode()
def generate(model: Transformer, prompts: Sequence[list[int]], max_new_tokens: int,
             choose: Callable[[Tensor], Tensor], group: dist.ProcessGroup | None = None,
             check_every_steps: int = 16) -> list[list[int]]:
    """Run on every rank at once: `max_new_tokens` new ids per prompt (no stop condition), prompts prefilled as
    one ragged batch, then one decode step per token, each token chosen by `decide`. Ranks are checked to agree
    every `check_every_steps` tokens and at the end. Returns each row's new ids."""
    weight = model.tok_embeddings.weight
    B, T = len(prompts), max(len(p) for p in prompts)
    cache = KVCache.for_model(model.args, B, T + max_new_tokens, weight.dtype, weight.device)
    tokens = torch.tensor([p + [0] * (T - len(p)) for p in prompts], dtype=torch.int64, device=weight.device)
    valid = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=weight.device)
    logits = model(tokens, cache.next_positions(B, T), cache, valid, last_only=True)  # (B, V)
    new: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        ids = decide(logits, choose, group)  # (B,)
        for row, token in zip(new, ids.tolist()):
            row.append(token)
        if (step + 1) % check_every_steps == 0 or step == max_new_tokens - 1:
            check_ranks_agree(new, weight.device, group)
        if step < max_new_tokens - 1:
            logits = model(ids[:, None], cache.next_positions(B, 1), cache, last_only=True)
    return new
