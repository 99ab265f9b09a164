import math

import pytest
import torch

from ead.sampling import SamplingParams, sample_next


def draws(logits, n, **params):
    g = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=params.pop("temperature", 1.0), **params)
    return torch.stack([sample_next(logits, p, g) for _ in range(n)])  # (n, B)


def test_greedy_is_argmax_per_row():
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.9, 0.0]])
    assert sample_next(logits, SamplingParams(), None).tolist() == [1, 0]


def test_seed_makes_sampling_reproducible_and_differs_across_seeds():
    logits = torch.zeros(1, 1000)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample_next(logits, SamplingParams(temperature=1.0), g).item() for _ in range(50)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_empirical_frequencies_match_softmax_at_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for t in (1.0, 0.5):
        counts = torch.bincount(draws(logits, 20000, temperature=t).flatten(), minlength=4).float() / 20000
        expected = torch.softmax(logits[0] / t, dim=-1)
        # 4 standard errors of a binomial proportion at n = 20000
        tol = 4 * torch.sqrt(expected * (1 - expected) / 20000) + 1e-3
        assert torch.all((counts - expected).abs() <= tol), (t, counts, expected)


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, 2.5]])
    seen = set(draws(logits, 2000, top_k=2).flatten().tolist())
    assert seen == {1, 4}
    assert set(draws(logits, 200, top_k=1).flatten().tolist()) == {1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.25, 0.15]])
    logits = torch.log(probs)
    # 0.5 < 0.6 so the second most likely (0.25) is needed; 0.75 >= 0.6 so nothing more.
    assert set(draws(logits, 2000, top_p=0.6).flatten().tolist()) == {1, 2}
    assert set(draws(logits, 2000, top_p=0.5).flatten().tolist()) == {1}
    assert set(draws(logits, 200, top_p=1e-6).flatten().tolist()) == {1}
    # Renormalised over the kept set: 0.5 / 0.75 = 2/3 for token 1.
    freq = (draws(logits, 20000, top_p=0.6).flatten() == 1).float().mean().item()
    assert freq == pytest.approx(2 / 3, abs=4 * math.sqrt(2 / 9 / 20000))
