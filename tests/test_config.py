import math

import pytest

from ead.config import EADConfig, EngineConfig, ModelSpec, Role, RouterConfig
from ead.errors import ConfigError
from ead.sampling import SamplingParams


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold_bits=-0.1), "tau must be >= 0"),
    (dict(threshold_bits=math.nan), "tau must be a number"),
    (dict(threshold_bits="0.5"), "tau must be a number"),
    (dict(window_tokens=0), "window must be an integer >= 1"),
    (dict(window_tokens=2.5), "window must be an integer"),
    (dict(min_dwell_tokens=-1), "d_min must be an integer >= 0"),
    (dict(start="medium"), "start must be 'small' or 'large'"),
])
def test_invalid_router_settings_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RouterConfig(**kwargs)


def test_paper_names_and_string_roles():
    cfg = RouterConfig.paper(tau=0.7, window=3, d_min=4, start="large")
    assert (cfg.threshold_bits, cfg.window_tokens, cfg.min_dwell_tokens, cfg.start) == (0.7, 3, 4, Role.LARGE)
    assert RouterConfig(threshold_bits=math.inf).threshold_bits == math.inf
    assert RouterConfig(threshold_bits=-math.inf).threshold_bits == -math.inf


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be"),
    (dict(temperature=math.inf), "temperature must be"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(seed="abc"), "seed must be"),
    (dict(stop=("",)), "stop strings must be non-empty"),
])
def test_invalid_sampling_settings_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)


def test_single_stop_string_becomes_a_tuple():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)


def test_composite_config_checks_its_parts():
    with pytest.raises(ConfigError, match="both --small and --large"):
        EADConfig(small=ModelSpec("a"), large=None)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        EngineConfig(dtype="float8")
    with pytest.raises(ConfigError, match="hub id, a folder or a .gguf"):
        ModelSpec("  ")
