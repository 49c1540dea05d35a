"""The one error type of the data room."""
from __future__ import annotations


class DataError(ValueError):
    """Bad data or a bad data option; the message names the value and the fix."""
