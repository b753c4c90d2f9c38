"""Inference: prompt handling, text chunking and the generation pipeline shared by the PyTorch
backend (torch_backend.py) and ONNX Runtime (zipvoice.onnx.runtime); flags.py holds the flags
of the inference entry points."""
