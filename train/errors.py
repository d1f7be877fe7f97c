"""The base of every error caused by bad user input.

Commands print such an error as one line and exit with code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    pass
