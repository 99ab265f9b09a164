"""Tests for ead/models/attention_kernel.py: the Triton decode attention against plain float64 softmax attention
over each row's own keys, and a whole model's decode logits with it against the same model's SDPA path.

On the CPU the kernels run under Triton's interpreter, which triton turns on only for a process that sets
TRITON_INTERPRET=1 before importing it: one fresh process (this file run as a script) computes every output,
and the tests here compare. On a GPU (`gpu` marker) they run compiled, eagerly and replayed from CUDA graphs.
Skipped where triton is not installed (CPU-only machines and CI need no triton).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from ead.models.kv_cache import KVCache
from ead.models.transformer import EAGER, Kernels, ModelArgs, Transformer

pytest.importorskip("triton")


def on_gpu(test: Callable) -> Callable:
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@dataclass(frozen=True)
class Case:
    """Batch row b reads cache row rows[b] and attends its first lengths[b] slots (0: a padding row)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_slots: int  # L, the attended span
    rows: tuple[int, ...]
    lengths: tuple[int, ...]
    keys_per_split: int | None = None  # None: the launcher's own rule
    q_scale: float = 1.0  # > 1: peaked softmax, the running max moves between blocks and splits


CASES = {  # group sizes 1, 5, 6, 7, 8; spans in one pass and in many splits, not multiples of the 64-key block
    "g1-d64-one-pass": Case(4, 4, 64, 100, rows=(2, 0, 1), lengths=(100, 37, 0)),
    "g5-d128-5-splits": Case(10, 2, 128, 300, rows=(1, 3, 0, 2), lengths=(300, 1, 0, 129), keys_per_split=64),
    "g6-d128-default-splits": Case(12, 2, 128, 1000, rows=(0, 1, 2), lengths=(1000, 513, 0)),
    "g7-d64-peaked": Case(14, 2, 64, 256, rows=(1, 0), lengths=(200, 256), q_scale=4.0),
    "g8-d64-uneven-splits": Case(32, 4, 64, 777, rows=(3, 2, 1, 0), lengths=(777, 64, 65, 0), keys_per_split=192),
    "g2-d8-padded-head-dim": Case(4, 2, 8, 70, rows=(0, 1), lengths=(3, 70)),
    "g6-d128-20k-span": Case(12, 2, 128, 20000, rows=(1, 0), lengths=(20000, 12345), q_scale=2.0),
}


def case_inputs(case: Case, seed: int, dtype: torch.dtype = torch.float32,
                device: str = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(q, k_cache, v_cache, rows, slots) for `case`, the same in every process. Every slot a row must not read
    holds NaN (past its length, the trash slot, rows of no batch row): one read would poison its output."""
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv, D = len(case.rows), case.n_heads, case.n_kv_heads, case.head_dim
    n_rows, trash = max(case.rows) + 2, case.n_slots + 5  # a row no one reads; slots past the span
    q = case.q_scale * torch.randn(B, 1, H, D, generator=gen)
    k, v = (torch.randn(n_rows, Hkv, trash + 1, D, generator=gen) for _ in range(2))
    read = torch.zeros(n_rows, trash + 1, dtype=torch.bool)
    for row, n in zip(case.rows, case.lengths):
        read[row, : max(n, 1)] = True  # a padding row reads slot 0
    k, v = (t.masked_fill(~read[:, None, :, None], math.nan) for t in (k, v))
    rows = torch.tensor(case.rows)
    slots = torch.tensor([n - 1 if n else trash for n in case.lengths])
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), rows.to(device), slots.to(device))


def reference(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, slots: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D)) v in float64, each row over slots 0..slots[b] (slot 0 alone for the trash
    slot), head h reading kv head h // G: (B, 1, H, D)."""
    B, _, H, D = q.shape
    G, trash = H // k.shape[1], k.shape[2] - 1
    out = torch.empty(B, 1, H, D, dtype=torch.float64)
    for b in range(B):
        n = 1 if slots[b] == trash else int(slots[b]) + 1
        keys = k[rows[b], :, :n].cpu().double().repeat_interleave(G, 0)  # (H, n, D)
        values = v[rows[b], :, :n].cpu().double().repeat_interleave(G, 0)
        w = torch.softmax(torch.einsum("hd,hnd->hn", q[b, 0].cpu().double(), keys) / math.sqrt(D), dim=-1)
        out[b, 0] = torch.einsum("hn,hnd->hd", w, values)
    return out


def assert_rows_close(ours: Tensor, ref: Tensor, max_rel_err: float, what: str) -> None:
    """Each batch row within max_rel_err * its own max |ref| (long rows average to small outputs)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ours = ours.cpu().double()
    bad = ours.isfinite().logical_not().flatten(1).any(1)
    assert not bad.any(), f"{what}: non-finite outputs in rows {bad.nonzero().flatten().tolist()}"
    for b in range(ref.shape[0]):
        diff, scale = (ours[b] - ref[b]).abs(), ref[b].abs().max()
        if diff.max() > max_rel_err * scale:
            first = tuple((diff > max_rel_err * scale).nonzero()[0].tolist())
            pytest.fail(f"{what}: row {b}: max abs diff {diff.max():.3e} (rel {diff.max() / scale:.3e} > "
                        f"{max_rel_err}); first mismatch at (t, head, dim) {first}")


def tiny_model(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """2 layers, 6 query heads on 2 kv heads (G = 3), head_dim 16, q/k/v biases; random weights."""
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=256, dim=64, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16,
                     intermediate_size=128, qkv_bias=True, max_position_embeddings=1024)
    model = Transformer(args).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    return model.to(device, dtype)


@torch.no_grad()
def decode_with_and_without(model: Transformer, kernel: Callable[..., Tensor]) -> tuple[Tensor, Tensor]:
    """Logits of 4 decode steps of 4 ragged rows (one idle, one joining late) over a 512-slot span (two splits
    by the launcher's rule), with `kernel` as decode attention and with SDPA: (steps, B, V) each."""
    device = model.inv_freq.device
    caches = [KVCache.for_model(model.args, 4, 600, model.tok_embeddings.weight.dtype, device) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    prompt_lengths = torch.tensor([300, 9, 0, 257])
    tokens = torch.randint(0, 256, (4, 300), generator=gen).to(device)
    for cache in caches:  # prefill (T > 1: SDPA in both)
        model(tokens, cache.next_positions(4, 300), cache, prompt_lengths.to(device), last_only=True, kv_len=512)
    out = []
    for cache, kernels in zip(caches, (Kernels(decode_attention=kernel), EAGER)):
        steps = []
        for step in range(4):
            valid = torch.tensor([1, 1, int(step >= 2), 1], device=device)  # row 2 idle, then starts
            ids = torch.randint(0, 256, (4, 1), generator=torch.Generator().manual_seed(step)).to(device)
            steps.append(model(ids, cache.next_positions(4, 1), cache, valid, last_only=True, kv_len=512,
                               kernels=kernels).float())
        out.append(torch.stack(steps))
    return out[0], out[1]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, Tensor]:
    """Every case's kernel output, and the model's decode logits with and without it, computed by this file run
    as a script under TRITON_INTERPRET=1 (triton reads it at import, so it takes a fresh process)."""
    path = tmp_path_factory.mktemp("interpreter") / "outputs.pt"
    run = subprocess.run([sys.executable, __file__, str(path)], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"the interpreter's process failed:\n{run.stderr[-4000:]}"
    return torch.load(path)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_matches_reference(interpreted, name):
    inputs = case_inputs(CASES[name], seed=list(CASES).index(name))
    assert_rows_close(interpreted[name], reference(*inputs), 1e-5, name)


def test_interpreted_kernel_gives_the_sdpa_decode_logits(interpreted):
    ours, ref = interpreted["model kernel"], interpreted["model sdpa"]
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4 * ref.abs().max().item(), f"max abs logit diff {diff:.3e}"


def test_compiled_kernels_use_the_triton_kernel_on_cuda_only():
    from ead.models.attention_kernel import decode_attention

    assert Kernels.compiled("cuda").decode_attention is decode_attention
    assert Kernels.compiled("cpu").decode_attention is None and EAGER.decode_attention is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(CASES))
@on_gpu
def test_kernel_matches_reference_on_gpu(name, dtype):
    from ead.models.attention_kernel import decode_attention

    case = CASES[name]
    inputs = case_inputs(case, seed=list(CASES).index(name), dtype=dtype, device="cuda")
    ours = decode_attention(*inputs, case.n_slots, case.keys_per_split)
    assert ours.dtype == dtype
    # bf16: the output's own rounding (2^-8) and the probabilities rounded to bf16 before multiplying values.
    assert_rows_close(ours, reference(*inputs), 1e-5 if dtype == torch.float32 else 2e-2, f"{name} {dtype}")


@on_gpu
def test_kernel_in_a_cuda_graph_reads_each_rows_length_at_replay():
    """One capture, replayed after the rows' lengths (slots) and cache rows change on the device."""
    from ead.models.attention_kernel import decode_attention

    case = CASES["g6-d128-default-splits"]
    q, k, v, rows, slots = case_inputs(case, seed=0, dtype=torch.bfloat16, device="cuda")
    k, v = k.nan_to_num(0.5), v.nan_to_num(-0.5)  # every slot finite: the lengths alone pick what is read
    decode_attention(q, k, v, rows, slots, case.n_slots)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, rows, slots, case.n_slots)
    for new_rows, new_slots in (((0, 1, 2), (999, 512, k.shape[2] - 1)), ((2, 2, 0), (0, 700, 37))):
        rows.copy_(torch.tensor(new_rows))
        slots.copy_(torch.tensor(new_slots))
        graph.replay()
        assert_rows_close(out, reference(q, k, v, rows, slots), 2e-2, f"rows {new_rows}, slots {new_slots}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@on_gpu
def test_model_decode_with_the_kernel_gives_the_sdpa_logits_on_gpu(dtype):
    from ead.models.attention_kernel import decode_attention

    ours, ref = decode_with_and_without(tiny_model("cuda", dtype), decode_attention)
    diff = (ours - ref).abs().max().item()
    assert diff <= (1e-4 if dtype == torch.float32 else 3e-2) * ref.abs().max().item(), f"max abs diff {diff:.3e}"


@on_gpu
def test_decode_graphs_with_the_kernel_give_the_eager_sdpa_logits():
    """NativeBatchRunner replaying decode graphs whose attention is the kernel (elementwise parts eager, so only
    attention differs) against the same runner eager with SDPA, float32: ragged rows, an idle row that joins
    late, spans 256 and 512 (one pass, then two splits)."""
    from ead.models.attention_kernel import decode_attention
    from ead.runner import NativeBatchRunner

    model = tiny_model("cuda")
    model.kernels = Kernels(decode_attention=decode_attention)  # graphs use model.kernels; eager passes EAGER
    fast = NativeBatchRunner(model, 256, max_seq_tokens=600, cuda_graphs=True, max_batch=4)
    slow = NativeBatchRunner(model, 256, max_seq_tokens=600, cuda_graphs=False, max_batch=4)
    gen = torch.Generator().manual_seed(5)
    feeds = [{0: torch.randint(0, 256, (40,), generator=gen).tolist(), 1: [3, 4, 5], 3: [9] * 200}]
    for i in range(120):  # one token per row; row 2 joins at step 60; rows 0 and 3 cross span 256
        feeds.append({s: [(i * 7 + s) % 256] for s in (0, 1, 2, 3) if s != 2 or i >= 60})
    for k, call in enumerate(feeds):
        slots = list(call)
        a, b = fast.feed_many(slots, [call[s] for s in slots]), slow.feed_many(slots, [call[s] for s in slots])
        diff = (a - b).abs().max().item()
        assert diff <= 1e-4 * b.abs().max().item(), f"call {k}: max abs logit diff {diff:.3e}"
    assert {span for *_, span in fast.graphs} == {256, 512}


if __name__ == "__main__":  # the interpreter's process (see `interpreted`): TRITON_INTERPRET=1 is set
    from ead.models.attention_kernel import decode_attention

    torch.set_num_threads(1)
    outputs = {name: decode_attention(*case_inputs(case, seed=i), case.n_slots, case.keys_per_split)
               for i, (name, case) in enumerate(CASES.items())}
    outputs["model kernel"], outputs["model sdpa"] = decode_with_and_without(tiny_model(), decode_attention)
    torch.save(outputs, sys.argv[1])
