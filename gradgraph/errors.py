"""The one exception class of gradgraph, and the one failure that is not a bad input."""


class GradGraphError(ValueError):
    """Raised for every bad input: the message says what was wrong and what to do."""


class OutputIncomplete(GradGraphError):
    """A study computed its results and saved them, but some of its tables, figures or reports
    failed: the message says which, where the results are, and how to draw them again
    (``gradgraph.studies.output``). The command exits with status 1 (a bad input: 2)."""
