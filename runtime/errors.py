"""Errors the runtime reports to the user as one located message (a path, a line, what
to do), never as a traceback: a worker that raises RunError stops the run with its
message; the traceback of anything else stays in the worker log."""


class RunError(Exception):
    """A problem with the run's inputs or its directory, told in one message."""
