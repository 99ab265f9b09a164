"""ead: Entropy Adaptive Decoding (arXiv 2502.06833).

A small and a large language model of one family share the writing of a text token by token: the small model
writes while the rolling entropy of its next-token distribution stays at or below tau bits, the large model
takes over above it and hands back when the text calms down.

    import ead
    pair = ead.load_pair()                      # the default Qwen2.5-Coder 0.5B/1.5B pair
    [res] = ead.generate(pair, [{"role": "user", "content": "What is 17*23?"}], ead.RouterConfig(threshold_bits=0.5))
    print(res.text, res.stats.large_share, res.stats.cost_ratio)
"""

from ead.config import EADConfig, EngineConfig, ModelSpec, Role, RouterConfig, SpeculativeConfig
from ead.engine import Engine, generate
from ead.errors import (CacheCapacityError, ConfigError, EADError, ModelLoadError, RequestError,
                        TokenizerMismatchError)
from ead.metrics import GenerateResult, GenerateStats, StepRecord, SwitchEvent, Trace
from ead.pair import ModelPair, load_pair
from ead.sampling import SamplingParams

__all__ = [
    "CacheCapacityError", "ConfigError", "EADConfig", "EADError", "Engine", "EngineConfig", "GenerateResult",
    "GenerateStats", "ModelLoadError", "ModelPair", "ModelSpec", "RequestError", "Role", "RouterConfig",
    "SamplingParams", "SpeculativeConfig", "StepRecord", "SwitchEvent", "TokenizerMismatchError", "Trace", "generate",
    "load_pair",
]
