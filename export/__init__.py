"""craft.export: compile a craft-train run directory into one self-contained .onnx file.

Start reading at exporter.py; graph.py builds the ONNX graph, quantize.py the int8 weights,
verify.py checks the file against PyTorch, cli.py is craft-export.
"""
