"""The error a study, its storage or its workers raise for a problem the user can fix (the CLI prints it
without a traceback)."""

from __future__ import annotations


class StudyError(ValueError):
    """A study that cannot be created, joined or run; the message says what to do."""
