"""The one exception type users see: a message that names the problem and the fix."""


class EdgezoError(Exception):
    """Bad input or an impossible request. The CLI prints `str(err)` on one line and exits 2."""
