"""Float-exact rewrites that make the float model easier to quantize (cross-layer equalization,
outlier migration, ...). They run after clean-up and before calibration, on a copy of the
cleaned-up graph (``LoadedModel.with_passes``): calibration, the rewrite and the float reference
the output is measured against all work from the transformed graph, whose outputs equal the
user's model's to float rounding. Each is chosen by an option of ``QuantConfig``."""

from __future__ import annotations

from onnxq.config import QuantConfig
from onnxq.passes import GraphPass
from onnxq.transform.equalize import EqualizePass


def float_exact_passes(config: QuantConfig) -> tuple[GraphPass, ...]:
    """The float-exact passes ``config`` asks for, in the order they run."""
    return (EqualizePass(),) if config.equalize else ()
