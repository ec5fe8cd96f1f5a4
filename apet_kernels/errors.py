"""The exceptions apet_kernels raises: one family under ``ApetError``, each also the built-in exception it
refines, so code that catches ``ValueError`` / ``TypeError`` / ``RuntimeError`` / ``FileNotFoundError`` still
catches them, and code that wants APET's own errors catches ``ApetError``."""


class ApetError(Exception):
    """Base of every exception apet_kernels raises on purpose."""


class ApetValueError(ApetError, ValueError):
    """A wrong value: a config field, a budget, indices out of range or duplicated, a shape that does not fit."""


class ApetTypeError(ApetError, TypeError):
    """A wrong kind of object: a module without a 2-D weight, a config that is not an ApetConfig, a float index."""


class ApetStateError(ApetError, RuntimeError):
    """A call refused in the current state: merged layers, a mixed-adapter batch, a sharded weight, a model already
    unloaded, positions not loaded yet."""


class StateDictError(ApetError, RuntimeError):
    """A state dict that cannot be loaded as a whole (wrong shapes, with strict=True missing or unexpected keys),
    refused before anything is copied; a RuntimeError, as torch's own."""


class AdapterFileError(ApetValueError):
    """A saved adapter that cannot be loaded as it is: damaged, incomplete, of another method or another format."""


class AdapterFileNotFoundError(ApetError, FileNotFoundError):
    """A file an adapter folder must hold is missing."""


class BaseMismatchError(ApetValueError):
    """An adapter saved for another base model: other layers or shapes, or (``strict=True``) other weights at its
    positions."""
