"""The one exception type the CLIs turn into a one-line message and a non-zero exit code."""


class PosiError(Exception):
    """A problem with the user's input (file, checkpoint, config, prompt): the message says what and where."""
