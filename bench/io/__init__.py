"""Third-party networks and properties in: ONNX graphs as PyTorch modules
(`onnx_import`, checked against onnxruntime) and VNN-LIB properties as input boxes with
unsafe output sets (`vnnlib`)."""
