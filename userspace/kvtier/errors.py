"""Errors that reach the user.

InputError is bad input (a config file, an option, a trace line): the CLI prints its message on one
line and exits 2. Kernel and syscall failures are OSError with errno set; the CLI exits 1 for them.
"""


class InputError(ValueError):
    """Bad input from the user; the message names the file, field or value at fault."""

    exit_code = 2
