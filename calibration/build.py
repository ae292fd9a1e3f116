"""Moved to ``advisor.stack.build`` (the one model builder); re-exported for callers outside calibration."""

from advisor.stack.build import BuiltModel, build, load_config, make_optimizer, save_random_model, spec_of

__all__ = ["BuiltModel", "build", "load_config", "make_optimizer", "save_random_model", "spec_of"]
