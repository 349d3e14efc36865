"""The analysis stage: graph clean-up, topology signatures, control-flow bodies, keep-float rules and sentinel ranges."""
