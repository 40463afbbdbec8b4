"""LPM: Large Population Models.

Populations as tensor rows, behaviour as vectorized differentiable substeps, parameters
fitted to real data by gradient descent. The core knows nothing of any domain.
"""

from lpm.interventions import Intervention, Modulate, group_mean, group_sum
from lpm.model import DataflowError, Hook, Model, ModelError, Observable, Run
from lpm.networks import Network
from lpm.params import Fixed, Interval, ParamError, Params, ParamsLike, ParamSpec, Positive, Real
from lpm.recording import Checkpoint, ProgressBar, TrajectoryRecorder
from lpm.results import Results
from lpm.rng import Streams, derive_seed
from lpm.state import (CodeBook, State, StateError, Struct, System, check_tensor, lookup, splice, static_field,
                       tensor_field)
from lpm.substep import FunctionSubstep, Substep, substep

__version__ = "0.1.0"

__all__ = [
    "State", "System", "Struct", "tensor_field", "static_field", "CodeBook", "StateError", "check_tensor", "lookup",
    "splice",
    "Params", "ParamsLike", "ParamSpec", "ParamError", "Positive", "Interval", "Real", "Fixed",
    "Substep", "substep", "FunctionSubstep",
    "Model", "Observable", "Hook", "Run", "ModelError", "DataflowError", "Results",
    "Network", "Streams", "derive_seed",
    "Intervention", "Modulate", "group_sum", "group_mean",
    "Checkpoint", "TrajectoryRecorder", "ProgressBar",
]
