"""The KV cache: keys and values of every row, allocated once, plus each row's length.

It owns the memory layout and the per-row bookkeeping (lengths, capacity, resetting a row). It leaves
the writes to `Transformer.forward`, which scatters each row's new keys and values in place, and leaves
the choice of which request lives in which row to the runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ead.errors import CacheCapacityError

if TYPE_CHECKING:
    from ead.models.transformer import ModelArgs


class KVCache:
    """Preallocated keys and values for `max_batch` rows of up to `max_seq_tokens` tokens each.

    `k`, `v`: (n_layers, max_batch, n_kv_heads, max_seq_tokens + 1, head_dim), `dtype` on `device`.
    Row b of a forward batch is cache row b, so a layer's view `k[i, :B]` needs no gather; a request keeps
    its row for life, and rows with nothing to do feed 0 valid tokens.
    Slot `max_seq_tokens` (the last) is the trash slot: padding tokens of a ragged batch write their keys
    and values there and no real query ever attends to it. It lets every row write T slots per call with
    static shapes, without a pad ever landing on a real token's slot, even next to a full row.
    `lengths`: (max_batch,) int64 on `device`, the tokens cached per row. `forward` advances it in place.
    """

    def __init__(self, n_layers: int, max_batch: int, n_kv_heads: int, max_seq_tokens: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, max_batch, n_kv_heads, max_seq_tokens + 1, head_dim)
        self.max_batch, self.max_seq_tokens = max_batch, max_seq_tokens
        # zeros, not empty: padding queries attend to slot 0, which must hold finite numbers before any write.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.int64, device=device)

    @classmethod
    def for_model(cls, args: ModelArgs, max_batch: int, max_seq_tokens: int, dtype: torch.dtype,
                  device: torch.device | str) -> KVCache:
        """A cache shaped for the model described by `args`."""
        return cls(args.n_layers, max_batch, args.n_kv_heads, max_seq_tokens, args.head_dim, dtype, device)

    @property
    def trash_slot(self) -> int:
        """Index of the slot that padding writes to; equal to max_seq_tokens."""
        return self.max_seq_tokens

    @property
    def kv_bytes(self) -> int:
        """Bytes held by keys and values together, trash slots included."""
        return 2 * self.k.numel() * self.k.element_size()

    def check_capacity(self, rows: Sequence[int], new_lengths: Sequence[int]) -> None:
        """Raise CacheCapacityError if any row would hold more than max_seq_tokens tokens.

        `new_lengths[i]` is the length, in tokens, that row `rows[i]` will have after the write. Host-side
        numbers only (no device sync), so the runner calls this before `forward`, which stays capturable.
        """
        for row, needed in zip(rows, new_lengths, strict=True):
            if needed > self.max_seq_tokens:
                raise CacheCapacityError(
                    f"KV cache row {row} needs {needed} tokens but holds at most max_seq_tokens="
                    f"{self.max_seq_tokens}; raise max_seq_tokens to at least {needed} or shorten the request.")

    def next_positions(self, n_rows: int, n_tokens: int) -> Tensor:
        """Positions of the next `n_tokens` tokens of rows 0..n_rows-1: (n_rows, n_tokens) int64.

        Padding positions may run past max_seq_tokens; forward never writes or reads there.
        """
        return self.lengths[:n_rows, None] + torch.arange(n_tokens, device=self.lengths.device)

    def reset_row(self, row: int) -> None:
        """Free `row` for a new request. Old keys and values stay: the mask hides every slot at or past
        the row's length, and the next writes overwrite them in order."""
        assert 0 <= row < self.max_batch, f"row {row} outside 0..{self.max_batch - 1}"
        self.lengths[row] = 0
