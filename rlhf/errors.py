"""User-facing errors.

A `UserError` is a mistake in what the user gave us (a config key, a data file, a model path).
The CLI prints its one-line message and exits with code 2, without a traceback; anything else is
a bug in the framework and keeps its traceback.
"""

import argparse


class UserError(Exception):
    """Bad input from the user: the message names the file/line/field/option and what was expected."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse for our commands: a bad option is a UserError (one line, exit 2, like every other
    refusal) instead of argparse's usage block; subcommand parsers are made of this class too."""

    def error(self, message: str):
        raise UserError(" ".join(message.split()))
