"""Every error ead raises on purpose. Each message names what failed, the offending value and the fix.

`assert` guards internal invariants; anything a user can cause raises one of these instead, so the CLI
and the server can report it without a traceback and keep going.
"""


class EADError(Exception):
    """Base class: catch this to handle every error ead raises on purpose."""


class ConfigError(EADError, ValueError):
    """An invalid setting: tau, window, d_min, sampling parameters, device, dtype."""


class ModelLoadError(EADError):
    """A model could not be found, fetched, converted or loaded."""


class TokenizerMismatchError(EADError):
    """The two models of a pair do not share one tokenizer."""


class CacheCapacityError(EADError):
    """A sequence does not fit the model's context (prompt too long)."""


class RequestError(EADError, ValueError):
    """A bad request: an empty prompt, malformed chat messages, a chat prompt for a model without a template."""


class DatasetError(EADError, ValueError):
    """A benchmark that cannot be read: an unknown dataset name, a missing file, a line without the needed keys."""


class RankDivergenceError(EADError):
    """The ranks of a tensor-parallel group hold different token ids: they no longer run one model."""
