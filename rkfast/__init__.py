"""rkfast: Runge-Kutta meta-updates (RK-MAML) for PyTorch, every task of a meta-batch at once.

Classic MAML is one tableau among many: pick ``tableau="maml"``, ``"heun"``, ``"rk4"``, ... on
:class:`MetaOptimizer` and train as with any ``torch.optim`` optimizer.
"""

from . import distributed, functional, kernels, models, tasks
from .batch import TaskBatch, TaskSet
from .capture import StepCapture
from .distributed import InconsistentParametersError, RankFailedError, TaskParallel
from .learned import Coefficients, LearnedRates, LearnedTableau, Rates, TableauCoefficients
from .memory import Memory
from .optim import MetaOptimizer, NonFiniteLossError
from .tableau import (
    InconsistentTableauWarning,
    Tableau,
    TableauTypeError,
    get_tableau,
    maml,
    maml_msl,
    named_tableaus,
    rk2,
)
from .taskmap import VmapUnsupportedError

__version__ = "0.1.0"

__all__ = [
    "MetaOptimizer",
    "Rates",
    "LearnedTableau",
    "StepCapture",
    "Memory",
    "Coefficients",
    "LearnedRates",
    "TableauCoefficients",
    "NonFiniteLossError",
    "RankFailedError",
    "InconsistentParametersError",
    "TaskParallel",
    "TaskBatch",
    "TaskSet",
    "Tableau",
    "InconsistentTableauWarning",
    "TableauTypeError",
    "VmapUnsupportedError",
    "get_tableau",
    "named_tableaus",
    "rk2",
    "maml",
    "maml_msl",
    "distributed",
    "functional",
    "kernels",
    "models",
    "tasks",
]
