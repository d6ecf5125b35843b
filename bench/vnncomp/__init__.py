"""VNN-COMP instances (ONNX network, VNN-LIB property, timeout) answered by each verifier
as the competition asks: `pipeline`."""
