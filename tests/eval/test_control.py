"""The random-routing control: its realised large share over many tokens is F, in d_min-token segments,
reproducible per (seed, problem id), and in the engine the trace follows it token for token."""

import math
import statistics
from itertools import pairwise

import pytest

from ead.config import Role
from ead.errors import ConfigError
from ead.eval.control import RandomRouter, problem_seed
from ead.router import RoutingPolicy


def roles(router: RandomRouter, n: int) -> list[Role]:
    """The role of each of n generated tokens, as the engine would see them."""
    out = []
    for i in range(n):
        out.append(router.active)
        router.observe(float(i % 7))  # entropies the control must ignore
    return out


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5, 0.85])
def test_realised_share_is_near_f(share):
    problems, tokens = 300, 400  # 300 * 40 = 12,000 segments of 10 tokens
    seq = [r for pid in range(problems) for r in roles(RandomRouter(share, problem_seed(0, f"p{pid}")), tokens)]
    realised = seq.count(Role.LARGE) / len(seq)
    sigma = math.sqrt(share * (1 - share) / (problems * tokens / 10))  # per-segment Bernoulli draws
    assert abs(realised - share) < 5 * sigma, (realised, share, sigma)


def test_share_varies_within_a_problem_in_whole_segments():
    seq = roles(RandomRouter(0.5, seed=1, block_tokens=10), 1000)
    blocks = [seq[i:i + 10] for i in range(0, 1000, 10)]
    assert all(len(set(b)) == 1 for b in blocks)  # one writer per d_min block
    per_block = [b[0] is Role.LARGE for b in blocks]
    assert 30 < sum(per_block) < 70  # both models write within one problem
    switches = sum(a != b for a, b in pairwise(per_block))
    assert 30 < switches < 70  # independent blocks switch about half the time, not once per problem


def test_per_problem_seeds_are_reproducible_and_distinct():
    a = roles(RandomRouter(0.4, problem_seed(3, "q1")), 300)
    assert a == roles(RandomRouter(0.4, problem_seed(3, "q1")), 300)
    assert a != roles(RandomRouter(0.4, problem_seed(3, "q2")), 300)
    assert a != roles(RandomRouter(0.4, problem_seed(4, "q1")), 300)
    assert problem_seed(3, "q1") == problem_seed(3, "q1") < 2**63


def test_extremes_and_dmin_zero():
    assert set(roles(RandomRouter(0.0, 1), 200)) == {Role.SMALL}
    assert set(roles(RandomRouter(1.0, 1), 200)) == {Role.LARGE}
    seq = roles(RandomRouter(0.5, 2, block_tokens=0), 400)  # d_min 0: a fresh draw per token
    assert 150 < seq.count(Role.LARGE) < 250 and sum(a != b for a, b in pairwise(seq)) > 120


def test_it_shows_a_rolling_mean_and_is_a_routing_policy():
    r = RandomRouter(0.5, 1, window_tokens=3)
    for bits in (1.0, 2.0, 3.0, 4.0):
        r.observe(bits)
    assert r.last_mean_bits == statistics.mean([2.0, 3.0, 4.0])
    policy: RoutingPolicy = r
    assert policy.active in (Role.SMALL, Role.LARGE)


@pytest.mark.parametrize("share", [-0.1, 1.5, math.nan, True])
def test_bad_share(share):
    with pytest.raises(ConfigError, match="large share must be in"):
        RandomRouter(share, 0)
