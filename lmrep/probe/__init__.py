"""The probe engine: invert every block of a model behind the probing surface.

- `settings`: `ProbeSettings`, what every result row records;
- `inputs`: what the gradient solver optimises per method, and decoding;
- `rows`: the row layout (targets, start noise, chunks) and the shared distance;
- `solver`: the seam, a solver answers a chunk of rows;
- `gradient`: the gradient solver (Adam / GD, patience);
- `exact`: the exact solver (method=exact: every candidate token scored, identifiability);
- `results`: `ProbeResult` and its plain rows;
- `engine`: `probe()` and `calibrate_lr()`.
"""

from lmrep.probe.engine import DEFAULT_CALIBRATION_GRID, calibrate_lr, probe
from lmrep.probe.exact import ExactSolver
from lmrep.probe.gradient import GradientSolver
from lmrep.probe.inputs import decoding_logits, topk_ids
from lmrep.probe.results import ProbeResult
from lmrep.probe.settings import CONTEXTS, FREES, LOSSES, LR_FINAL_FRACTION, METHODS, OPTIMIZERS, ProbeSettings
from lmrep.probe.solver import Answers, Solver

__all__ = [
    "CONTEXTS", "DEFAULT_CALIBRATION_GRID", "FREES", "LOSSES", "LR_FINAL_FRACTION", "METHODS", "OPTIMIZERS",
    "Answers", "ExactSolver", "GradientSolver", "ProbeResult", "ProbeSettings", "Solver", "calibrate_lr", "decoding_logits",
    "probe", "topk_ids",
]
