"""The project's own error types: expected failures whose one-line message names the file, key or value at fault.

The command lines (`crate_mae/cli.py`, `python -m crate_mae.viz`, the export tool) print a `CrateError` as one line
`error: ...` and exit; anything else (a bug of ours, an error inside torch, timm or scikit-learn) keeps its
traceback, so that it shows where it came from. Each type also derives from the built-in type it refines, so
`except ValueError` in a caller's code keeps working.
"""
from __future__ import annotations


class CrateError(Exception):
    """An expected failure, told in one line that names what is at fault."""


class CheckpointError(CrateError, ValueError):
    """A weight or run file that cannot be used: unreadable, of no known layout, of another family or
    architecture, or with a tensor that does not fit the model (the key and both shapes named)."""


class MissingFileError(CrateError, FileNotFoundError):
    """A file the run needs is not there (the path named)."""


class RunFolderError(CrateError, FileExistsError):
    """A run folder already holds another run's results, which a new run would overwrite."""


class InputError(CrateError, ValueError):
    """An input of impossible shape for the model: an image side the patch does not divide, a stride off the grid."""


class ShardError(CrateError, ValueError):
    """A shard set that cannot be read or written as asked: the message names the path at fault."""
