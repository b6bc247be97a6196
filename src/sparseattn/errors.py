"""sparseattn's own errors: bad input, or a fault it recognises. Every message names the bad value, what was
expected, and where it came from (the file and line of data, the spec and the position in a plan).

    SparseattnError                 the base; the CLI prints these as one-line errors, never a traceback
    ├── ConfigError (ValueError)    an option, argument or spec entry with a bad value
    │   ├── ConfigTypeError (TypeError)   ... of the wrong type
    │   └── PlanError, PlanSpecError, PlanFileError (sparseattn.plans.errors); SweepSpecError
    ├── DataError (ValueError)      a data file whose content is not what was expected (file:line)
    ├── NotFoundError (FileNotFoundError)   a path that was named does not exist
    ├── DependencyError (ImportError)       an optional package a command needs is not installed
    └── StorageError (OSError)      the results database cannot be opened or written

Each also derives from the built-in exception it refines, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class SparseattnError(Exception):
    """Bad input or a recognised fault; the message says what, what was expected, and where."""


class ConfigError(SparseattnError, ValueError):
    """An option, argument or spec entry with a bad value."""


class ConfigTypeError(ConfigError, TypeError):
    """An option, argument or spec entry of the wrong type."""


class DataError(SparseattnError, ValueError):
    """A data file whose content is not what was expected; the message names the file and line."""


class NotFoundError(SparseattnError, FileNotFoundError):
    """A file or folder that was named does not exist."""


class DependencyError(SparseattnError, ImportError):
    """An optional package that this needs is not installed."""


class StorageError(SparseattnError, OSError):
    """A results database or result file that cannot be opened, read or written."""
