"""Craft: train a small Llama-style model, compile it to one ONNX file, run it on a small CPU.

This package is the training side (craft.config, craft.data, craft.model, craft.train);
craft.export is the compiler and craft.runtime the on-device runtime. This file must stay
free of heavy imports: a device that installs only the runtime imports it too.
"""

__version__ = "0.1.0"
