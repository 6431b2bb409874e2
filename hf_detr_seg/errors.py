"""Errors caused by the user's input; the CLI prints their message and exits with status 2."""


class UserInputError(Exception):
    """Bad input (file, field or option); the message names it and says what was expected."""


class DataError(UserInputError):
    """An image, mask or dataset folder that cannot be used."""


class TrainingError(UserInputError):
    """Training cannot go on (NaN loss, wrong stage-1 folder); earlier outputs are left untouched."""
