"""ONNX export (export.py) and inference on onnxruntime (runtime.py)."""
