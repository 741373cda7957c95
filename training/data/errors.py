"""Errors of the data stage's loaders."""

from __future__ import annotations


class DatasetFormatError(ValueError):
    """A dataset's files are not in the format its importer reads (file and line named).

    A ``ValueError`` so callers that caught the loaders' ``ValueError`` keep working; the command
    line prints it as one line with exit code 2.
    """
