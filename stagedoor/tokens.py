"""The credential verifier's public names, from where the rest of stagedoor imports them.

The code lives in ``stagedoor/auth/`` (settings, key sets, one strategy per credential kind,
the verifier); this module re-exports its public interface unchanged.
"""

from .auth import *  # noqa: F403
from .auth import __all__  # noqa: F401
