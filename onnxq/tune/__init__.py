"""The tune stage: per-layer choices measured after calibration (``layers``: saturation,
fusion, sentinels) and accuracy-driven mixed precision: metrics (``metrics``), per-unit
sensitivity (``sensitivity``), the fallback search (``search``) and its driver (``fallback``).

1. A metric scores a model's outputs against the float model's on the evaluation data (higher is
   better); the float model's own score is the reference, and a model passes when its score is
   at least ``reference - max_drop * |reference|``.
2. Sensitivity of a unit of nodes: the model-output error (noise power over signal power,
   averaged over outputs) with only that unit kept float, subtracted from the error of the
   plain int8 model (``only-float``), or the error with only that unit quantized, less the
   error with every unit float (``only-quantized``); measured on a few evaluation samples. Large graphs are measured in groups
   of neighbouring units first, and only the most sensitive groups unit by unit
   (``rank_units``), which keeps the number of trial models near 7 sqrt(n).
   Nodes are kept float in units: a quantized tensor is float only when its producer and all
   its quantized readers are, so a unit is a compute node with the compute nodes that read it.
3. A candidate passes when the metric meets the target on the whole evaluation set and on each
   of its halves (``check_halves``). The search keeps the most sensitive units float: it doubles a prefix of the ranking until the
   metric passes, bisects down to the shortest passing prefix, then tries to re-quantize chunks
   of its units (least sensitive first, halving the chunk size) and finally single nodes,
   keeping every change the metric allows, within ``max_trials`` evaluated models.
"""
