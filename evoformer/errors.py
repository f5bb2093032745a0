"""Errors raised for bad user input (config keys, input files).

Every message is one line naming the offending file or key and what is wrong with it.
"""


class InputError(ValueError):
    """Bad user input: a file or config key that cannot be used as given."""
