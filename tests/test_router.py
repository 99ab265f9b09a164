import math
import statistics

import pytest
import torch

from ead.config import Role, RouterConfig
from ead.router import RollingMean, Router, TokenSignals, choose_model, entropy_bits, token_signals


@pytest.mark.parametrize("vocab", [2, 7, 256, 151936])
def test_uniform_distribution_has_log2_v_bits(vocab):
    for logits in (torch.zeros(vocab), torch.full((vocab,), 3.7)):
        assert entropy_bits(logits).item() == pytest.approx(math.log2(vocab), abs=1e-4)


def test_one_hot_has_zero_bits_even_with_infinite_logits():
    logits = torch.full((1000,), -math.inf)
    logits[17] = 0.0
    assert entropy_bits(logits).item() == 0.0
    assert entropy_bits(torch.tensor([0.0, -1e4, -1e4])).item() == pytest.approx(0.0, abs=1e-6)


def test_hand_computed_distributions_batched_and_bf16():
    # p = (1/2, 1/4, 1/4): H = 1/2*1 + 2 * 1/4*2 = 1.5 bits; p = (0.9, 0.1): H = -(.9 log2 .9 + .1 log2 .1)
    probs = [[0.5, 0.25, 0.25], [0.9, 0.1, 0.0]]
    expected = [1.5, -(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1))]
    logits = torch.log(torch.tensor(probs))  # log 0 = -inf is a valid logit
    got = entropy_bits(logits)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert entropy_bits(logits.bfloat16()).tolist() == pytest.approx(expected, abs=2e-2)


def test_token_signals_match_hand_computed_values():
    # p = (1/2, 1/4, 1/4): surprisals 1, 2, 2 bits; H = 1.5; varentropy = 1/2*(1-1.5)^2 + 1/2*(2-1.5)^2 = 0.25;
    # top-1 0.5, margin 0.25. p = (0.9, 0.1, 0): H from the formula, top-1 0.9, margin 0.8.
    probs = [[0.5, 0.25, 0.25], [0.9, 0.1, 0.0]]
    h2 = -(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1))
    v2 = 0.9 * (-math.log2(0.9) - h2) ** 2 + 0.1 * (-math.log2(0.1) - h2) ** 2
    got = token_signals(torch.log(torch.tensor(probs)))
    assert got.shape == (2, 4)
    assert got[0].tolist() == pytest.approx([1.5, 0.25, 0.5, 0.25], abs=1e-5)
    assert got[1].tolist() == pytest.approx([h2, v2, 0.9, 0.8], abs=1e-5)
    assert TokenSignals.from_values(got[1].tolist()).margin == pytest.approx(0.8, abs=1e-5)


def test_token_signals_top_two_match_topk_and_ties_give_margin_zero():
    # The reference is torch.topk, which token_signals no longer calls; rows 1-2 tie for the largest.
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 3
    logits[1, [5, 700]] = 20.0
    logits[2, :] = 0.0
    top2 = torch.softmax(logits, dim=-1).topk(2, dim=-1).values
    got = token_signals(logits)
    assert got[:, 2].tolist() == pytest.approx(top2[:, 0].tolist(), abs=1e-7)
    assert got[:, 3].tolist() == pytest.approx((top2[:, 0] - top2[:, 1]).tolist(), abs=1e-7)
    assert got[1, 3].item() == 0.0 and got[2, 3].item() == 0.0 and got[2, 2].item() == pytest.approx(1e-3)


def test_router_takes_signals_or_plain_bits_alike():
    cfg = RouterConfig(threshold_bits=0.5, window_tokens=1, min_dwell_tokens=0)
    a, b = Router(cfg), Router(cfg)
    for bits in (0.1, 0.9, 0.2):
        assert a.observe(bits) is b.observe(TokenSignals(entropy_bits=bits, top1_prob=0.99))


def test_rolling_mean_equals_statistics_mean_of_window():
    values = [0.3, 2.0, 0.0, 5.5, 1.25, 0.75, 3.0, 0.1]
    rm = RollingMean(5)
    for i, v in enumerate(values):
        assert rm.push(v) == pytest.approx(statistics.mean(values[max(0, i - 4): i + 1]))


S, L = Role.SMALL, Role.LARGE


@pytest.mark.parametrize("mean, active, since, expected", [
    (0.6, S, 10, L), (0.5, S, 10, S), (0.6, S, 9, S), (0.4, L, 10, S), (0.5, L, 10, S), (0.51, L, 10, L),
    (0.0, L, 3, L),
])
def test_choose_model(mean, active, since, expected):
    assert choose_model(mean, active, since, RouterConfig(threshold_bits=0.5, min_dwell_tokens=10)) is expected


def roles_for(entropies, **cfg):
    """The role that produced each token: token i is written by the role active before observing its entropy."""
    router, roles = Router(RouterConfig(**cfg)), []
    for h in entropies:
        roles.append(router.active.value[0])
        router.observe(h)
    return "".join(roles)


@pytest.mark.parametrize("entropies, cfg, expected", [
    # A burst of high entropy after the dwell: the mean over 5 crosses 1.0 at token 12 (0,..,0,3,3 -> 1.2),
    # so token 13 is the large model's; it stays 10 tokens, the mean has fallen by then, and the small returns.
    ([0.0] * 11 + [3.0, 3.0] + [0.0] * 15, dict(threshold_bits=1.0, window_tokens=5, min_dwell_tokens=10),
     "s" * 13 + "l" * 10 + "s" * 5),
    # High entropy from the start: the switch waits for the small model's 10 tokens.
    ([2.0] * 14, dict(threshold_bits=1.0, window_tokens=5, min_dwell_tokens=10), "s" * 10 + "l" * 4),
    # Dwell 0, window 1: every token decides alone; > tau goes large, == tau goes back to small.
    ([2.0, 0.0, 1.0, 1.01, 5.0, 0.0], dict(threshold_bits=1.0, window_tokens=1, min_dwell_tokens=0), "slssll"),
    # Window 3 smooths a single spike away: (0 + 0 + 2.4) / 3 = 0.8 <= 1.0.
    ([0.0, 0.0, 2.4, 0.0, 0.0], dict(threshold_bits=1.0, window_tokens=3, min_dwell_tokens=0), "sssss"),
    # tau = -inf starting on large never leaves it; tau = +inf never reaches it.
    ([0.0, 9.0, 0.0], dict(threshold_bits=-math.inf, min_dwell_tokens=0, start=Role.LARGE), "lll"),
    ([9.0] * 30, dict(threshold_bits=math.inf), "s" * 30),
])
def test_switching_rule_on_scripted_entropy(entropies, cfg, expected):
    assert roles_for(entropies, **cfg) == expected
