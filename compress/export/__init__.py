"""Export of compressed models: ONNX graphs that keep the compression, checked in onnxruntime."""
