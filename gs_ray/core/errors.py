"""Errors gs_ray raises for problems the user can fix.

The CLI prints these as one clear message and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class GsRayError(Exception):
    """Base class: a problem with the user's input, config or environment."""


class ConfigError(GsRayError):
    """An unknown key, a value of the wrong type, or an impossible setting."""


class DataError(GsRayError):
    """Input data that cannot be read or does not match a supported schema."""


class ModelError(GsRayError):
    """A model or adapter that cannot be found or loaded."""


class JobError(GsRayError):
    """A submitted job the Ray cluster does not know (a wrong or expired job id)."""


class StorageError(GsRayError):
    """The run directory's storage refused a write, after retries (an outage, a missing permission)."""
