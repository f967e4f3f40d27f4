"""interp-workbench core: subjects, the task suite, the zoo, results and the lenses.

Tensors and data in, result objects out. Nothing here imports a UI library; the
``widgets`` package draws what this package computes.
"""

from workbench.errors import WorkbenchError
from workbench.results import Result, provenance
from workbench.subject import Batch, Subject, from_model, load
from workbench.threads import available_cpus, configure_from_env, reproducible, set_threads

configure_from_env()  # torch threads follow the CPU share we get (see workbench.threads)

__version__ = "0.1.0"
__all__ = ["Batch", "Result", "Subject", "WorkbenchError", "available_cpus", "from_model", "load", "provenance",
           "reproducible", "set_threads"]
