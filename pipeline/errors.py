"""The one exception type the CLI treats as the user's to fix.

`hydravision` prints a UserError as one `error: ...` line (exit 2) and anything else as the bug it is:
the traceback goes to the log (exit 1). A ValueError is not a user error just because bad input often
raises one; code that has checked the user's input says so by raising (a subclass of) UserError.
It imports nothing, so the config and the commands can share it without import cycles; models/ may
not import pipeline/, so its errors are translated at the command boundary (pipeline/model_commands.py).
"""

from __future__ import annotations


class UserError(Exception):
    """Input the user can fix (a config, an argument, a file they named); the message says what and where."""
