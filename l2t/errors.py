"""The one base class of the errors a user can fix, and what the commands do with them.

Every `python -m l2t.*` command exits with one convention:

    0  done
    1  a user error: a bad config, data file, image, model or run folder (an `L2TError`);
       the message is printed as one `error: ...` line, never a traceback
    2  bad command-line usage, as argparse reports it

The specific errors (`ConfigError`, `DataError`, `ImageError`, `ModelError`,
`RunFolderError`, `EvaluationError`, `MergeError`) derive from `L2TError` and
keep their other bases (`ValueError`, `RuntimeError`), so both kinds of
`except` clause catch them. The UI shows an `L2TError` as a message on the page.
"""

from __future__ import annotations

import sys

USER_ERROR = 1
"""Exit status of a command stopped by an `L2TError`."""


class L2TError(Exception):
    """Something the user can fix; the message names the file, key or value."""


def print_error(error: BaseException | str) -> int:
    """Print `error: <message>` to stderr; returns the exit status for a user error."""
    print(f"error: {error}", file=sys.stderr)
    return USER_ERROR
