"""Reading and writing ONNX files: load and checks, tensors and external data, atomic streamed writes."""
