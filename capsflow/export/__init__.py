"""Exporters: a compiled capsflow graph written in another format.

``capsflow.export.onnx`` writes the inference forward graph as an ONNX model
(``capsflow export``, docs/export.md). It needs ``pip install 'capsflow[onnx]'``, so it
is imported on its own, not from here.
"""
