"""The experiment config: the schema (:mod:`fedlm.config.schema`, one model per YAML section), loading and saving
(:mod:`fedlm.config.io`) and the cross-section compatibility rules (:mod:`fedlm.config.rules`).

Packages below the config import :mod:`fedlm.config.schema` only; this package's face re-exports the schema."""

from fedlm.config.schema import *  # noqa: F403 - the sections, by name
from fedlm.config.schema import __all__  # noqa: F401
