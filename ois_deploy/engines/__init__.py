"""Inference engines built from the exported graphs (ONNX Runtime, TensorRT)."""
