"""Errors that carry one plain sentence for the user.

Anything raised as an `IaptnetError` is a user's or operator's mistake (or a model that cannot
be fitted) and is printed as its message with a non-zero exit, never as a traceback.
"""


class IaptnetError(Exception):
    """Base: the message is the whole story for the user."""

    exit_code = 2


class SpecError(IaptnetError):
    """A study, schema, network or config file is wrong."""


class DataError(IaptnetError):
    """A data file is unreadable or does not meet its schema."""


class ModelError(IaptnetError):
    """The model cannot be fitted on the pooled data (separation, collinearity, empty cohort)."""

    exit_code = 3


class NetworkError(IaptnetError):
    """Nodes did not answer, refused, or failed."""

    exit_code = 4
