"""Errors a user can act on. The CLI prints them in one line, without a traceback."""


class PreflabError(Exception):
    """Base class: a problem the user can fix (bad input, bad config, missing model)."""


class ConfigError(PreflabError):
    """A config key is unknown, has the wrong type or is out of range. The message names the key."""


class DataError(PreflabError):
    """A data file is malformed. The message names the file and the line."""


class ModelError(PreflabError):
    """A model cannot be found or loaded."""


class TrainingError(PreflabError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is intact."""
