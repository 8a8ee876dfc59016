"""Typed exceptions. Every user-facing failure is one of these, with a message that names
the argument (or config key, or path) and says what was expected."""


class TurboLMError(Exception):
    """Base class of every error turbolm raises on purpose."""


class InputError(TurboLMError, ValueError):
    """An op or function was given an argument it cannot use."""


class DTypeError(InputError, TypeError):
    """A tensor has the wrong dtype."""


class ShapeError(InputError):
    """A tensor has the wrong shape."""


class DeviceError(InputError):
    """Tensors are on different devices, or on a device the backend cannot use."""


class BackendError(TurboLMError, RuntimeError):
    """A backend that was asked for by name is unknown, unavailable or cannot run these inputs."""


class ConfigError(TurboLMError, ValueError):
    """A config file, key or value is invalid."""


class DataError(TurboLMError, ValueError):
    """Input data (paths, files, JSONL records, prepared shards) is missing or malformed."""


class CheckpointError(TurboLMError, RuntimeError):
    """A checkpoint is missing, incomplete, truncated, or belongs to something else."""
