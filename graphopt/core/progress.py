"""A status message that is also a step count: how a long pass shows a progress bar.

A pass reports progress through ``PassContext.say`` (one line of text). :class:`Steps` *is* that line
(a ``str``), so every progress callback keeps working, and it carries ``done``/``total`` and the
fields shown beside the bar, so a front end that knows it (the command line's status area) draws a
bar instead of the text.
"""

from __future__ import annotations


class Steps(str):
    """``"{what} {done}/{total} {fields}"``, with the numbers kept for a progress bar."""

    what: str
    done: int
    total: int
    fields: str

    def __new__(cls, what: str, done: int, total: int, fields: str = "") -> Steps:
        text = f"{what} {done}/{total}" + (f" {fields}" if fields else "")
        self = super().__new__(cls, text)
        self.what, self.done, self.total, self.fields = what, done, total, fields
        return self
