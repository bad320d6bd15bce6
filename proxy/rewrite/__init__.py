"""The rewrite layer: what a request becomes, what a reply becomes, and what is rejected.

Pure functions over decoded commands, with no I/O: `rewrite_request` encrypts and
rewrites a client's command for a protected namespace, `reveal_reply` applies the
connection's views to a reply, and `needs_rewrite` returns whether the session must decode
a frame at all.
"""

from .context import RewriteContext, Scope
from .errors import CommandError, bad_value
from .reply import reveal_reply
from .request import needs_rewrite, rewrite_request

__all__ = [
    "CommandError",
    "RewriteContext",
    "Scope",
    "bad_value",
    "needs_rewrite",
    "reveal_reply",
    "rewrite_request",
]
