"""Verification: inputs, running models in onnxruntime or numpy, comparison, blame."""
