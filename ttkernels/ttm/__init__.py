"""TT-matrix (MPO) adapters."""

from .ops import *  # noqa: F403
from .ops import __all__  # noqa: F401
