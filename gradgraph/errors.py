"""The one exception class of gradgraph."""


class GradGraphError(ValueError):
    """Raised for every bad input: the message says what was wrong and what to do."""
