"""Deployment artifacts: ONNX graphs (onnx.py), int8 quantization, and transformers-loadable weights (hf.py)."""
