"""One exception type for expected mistakes.

The CLI turns an `LmlabError` into a single line on stderr and a non-zero exit;
anything else is a bug and keeps its traceback.
"""


class LmlabError(Exception):
    """A mistake the user can fix: bad path, bad key, mismatched data."""
