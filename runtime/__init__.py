"""craft.runtime: generate text from a Craft .onnx file on a small CPU.

Imports only numpy, onnxruntime, sentencepiece and the standard library - never torch or onnx -
so a device can install it alone. Start reading at generator.py (the Python API); cli.py is
craft-run; artifact.py is the file contract shared with the compiler.
"""
