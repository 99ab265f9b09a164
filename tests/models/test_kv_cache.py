"""Tests for ead/models/kv_cache.py: sizes, capacity errors, positions and row reset, without a model."""

from __future__ import annotations

import pytest
import torch

from ead.errors import CacheCapacityError
from ead.models.kv_cache import KVCache


def small_cache() -> KVCache:
    return KVCache(n_layers=2, max_batch=3, n_kv_heads=2, max_seq_tokens=8, head_dim=4, dtype=torch.bfloat16,
                   device="cpu")


def test_layout_and_kv_bytes():
    cache = small_cache()
    assert cache.k.shape == (2, 3, 2, 9, 4)  # one trash slot past max_seq_tokens
    assert cache.kv_bytes == 2 * (2 * 3 * 2 * 9 * 4) * 2  # k and v, bf16 = 2 bytes


def test_check_capacity_accepts_full_rows_and_names_the_overflow():
    cache = small_cache()
    cache.check_capacity([0, 2], [8, 0])
    with pytest.raises(CacheCapacityError, match=r"row 2 needs 9 tokens.*max_seq_tokens=8.*at least 9"):
        cache.check_capacity([0, 2], [3, 9])


def test_next_positions_follow_lengths_and_reset_frees_a_row():
    cache = small_cache()
    cache.lengths[:3] = torch.tensor([0, 5, 2])
    assert cache.next_positions(3, 2).tolist() == [[0, 1], [5, 6], [2, 3]]
    cache.reset_row(1)
    assert cache.lengths.tolist() == [0, 0, 2]
