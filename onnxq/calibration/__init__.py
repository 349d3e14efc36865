"""The calibration stage: data sources (arrays, loaders, image folders), observers, the calibration model and the runner."""
