"""Errors meant for the person running a build.

Anything raised as a ``UserError`` is printed by the CLI as one paragraph, without a traceback,
and makes ``df-hf`` exit with status 1.  Every message says what was wrong and what to do.
"""


class UserError(Exception):
    """A problem the user can fix: a bad recipe, a missing file, a changed recipe, ..."""


class RecipeError(UserError):
    """A recipe file that does not match the schema."""
