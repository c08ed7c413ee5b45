"""Kiln: serverless Python functions on GPUs, with hardware-speed cold starts.

This module is the public SDK surface and stays light: it imports neither torch nor any
database or messaging driver. Issue 3 adds `App`, `enter`, `exit`, `method` and friends here.
"""

from kiln._version import __version__

__all__ = ["__version__"]
