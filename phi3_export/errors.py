"""One exception type for everything a user can get wrong.

Its message is a single line naming the file (or option) and the problem; the CLI
prints it as ``error: <message>`` and exits with status 2, with no traceback.
"""


class Phi3ExportError(Exception):
    """A problem with the user's input: checkpoint, recipe, options or output path."""


class NotSupportedYet(Phi3ExportError):
    """An architecture or feature the registry knows of but cannot export yet."""
