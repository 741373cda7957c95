"""The anchor stage's error base class: bad inputs or settings, never a bug.

The CLI prints these as one line with exit code 2 instead of a traceback. The more specific
:class:`training.anchors.catalog.ItemSemanticsError` and
:class:`training.anchors.vocab.SidVocabularyError` derive from it.
"""

from __future__ import annotations


class AnchorInputError(ValueError):
    """The anchor stage cannot run on the inputs or settings given (the message says why)."""
