"""Deployable files of a student: ONNX export checked in onnxruntime (``kd.deploy.onnx``)."""
