"""Import torch for the command line without its NumPy warning on every command.

When NumPy is missing, or built for another ABI, ``import torch`` warns "Failed to
initialize NumPy" (a `UserWarning` from torch's C++ side). Nothing the command line does
needs NumPy, so when this process is the command line (``torch-modelstate`` or
``python -m torch_modelstate``) that one warning is ignored for the duration of the
import. A library user still sees it: whether NumPy works is their business.
This module is imported first by the package, before anything else imports torch.
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings

__all__ = ["running_the_command_line"]

_NUMPY_WARNING = r"Failed to initiali[sz]e NumPy"
_SCRIPT = "torch-modelstate"
_MODULES = ("torch_modelstate", "torch_modelstate.cli")


def running_the_command_line() -> bool:
    """Whether this process was started as ``torch-modelstate`` or ``python -m torch_modelstate``.

    >>> running_the_command_line()  # under pytest
    False
    """
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    if script in (_SCRIPT, _SCRIPT + ".exe", _SCRIPT + "-script.py"):
        return True
    argv = list(getattr(sys, "orig_argv", ()))
    return any(a == "-m" and b in _MODULES for a, b in itertools.pairwise(argv))


with warnings.catch_warnings():
    if running_the_command_line():
        warnings.filterwarnings("ignore", message=_NUMPY_WARNING, category=UserWarning)
    import torch  # noqa: F401
