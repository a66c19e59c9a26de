"""User-facing errors: one clear line naming the problem and the fix."""


class FedlmError(Exception):
    """An error caused by the user's input or environment; the CLI prints its message without a traceback."""
