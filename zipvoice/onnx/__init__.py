"""ONNX export (export.py) and inference on onnxruntime (runtime.py)."""

# Here, not in export.py, so that onnx_export's --help imports neither torch nor onnx.
EXPORTERS = ("torchscript", "dynamo")
