"""The load stage: read and check the float model, fit its opset, correct its shapes, prepare the graph."""
