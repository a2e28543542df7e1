"""Shipping a trained model: export (ONNX, pt2, safetensors), int8 quantization, CPU bench."""
