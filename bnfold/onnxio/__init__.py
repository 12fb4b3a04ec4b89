"""Reading and writing ONNX files: load and checks, tensors and external data, atomic streamed writes.

One job per module:

- ``load``: load a model without its external data and check it (one clear error per bad input).
- ``embedded``: big embedded initializers left in the model file, read as references to their own bytes.
- ``buffers``: reused memory for big weights and products.
- ``wire``: protobuf wire-format primitives.
- ``tensors``: the tensors of a model, the one tensor index built at load, and the one
  validated way to read external data (:class:`~bnfold.onnxio.tensors.ExternalReader`).
- ``layout``: whether an output is embedded or has one external data file.
- ``sink``: the staging sink folded weights are written to while the fold runs.
- ``copy``: moving tensor bytes into the output's data file, or back into the model.
- ``protowire``: serializing a model one initializer at a time (protobuf wire format).
- ``writer``: the one write path: temporary names, checks, ``before_commit``, one rename.
- ``fsutil``: temporary files a signal cannot leak, fsync, folder locks, file identity.
"""
