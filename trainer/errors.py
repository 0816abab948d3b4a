"""The one exception type the CLI turns into a short message instead of a traceback."""


class ZerorayError(Exception):
    """A problem the user can fix: the message names the key, file or value and how to fix it."""


class SpecError(ZerorayError):
    """The run spec (YAML plus overrides) is invalid."""


class RunPreempted(ZerorayError):
    """The run stopped on request (SIGTERM, a stop file) after a checkpoint; the message says how to resume."""
