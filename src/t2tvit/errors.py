"""The errors t2tvit raises on purpose, under one base class.

`InputError` is what the user can fix (a bad value, file, checkpoint or data set): the command line prints its
one-line message and exits with status 2. Any other exception is a bug: exit 1 and a traceback file. The class
decides, never the message text, so library errors whose meaning is known (an unreadable image, a full disk, an
unknown timm name) are wrapped into an `InputError` where they are caught, not at the top by builtin type.

The builtin base each class also has (`ValueError`, `OSError`, `RuntimeError`) keeps `except ValueError` in
library callers working. This module imports only the standard library.
"""


class T2TViTError(Exception):
    """Base of every exception t2tvit defines."""


class InputError(T2TViTError):
    """Bad input the user can fix; the message names the problem and the fix (exit status 2)."""


class TrainingDiverged(T2TViTError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept (exit status 3)."""


class PeerLost(T2TViTError):
    """Under torchrun, a collective failed because another process of the group stopped; `torchrun --max-restarts`
    restarts the group, which resumes from the last checkpoint (exit status 4)."""
