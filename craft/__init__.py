"""Craft: train a small Llama-style model, compile it to one ONNX file, run it on a small CPU.

This package is the training side (craft.config, craft.data, craft.model, craft.train);
craft.export is the compiler and craft.runtime the on-device runtime. This file must stay
free of heavy imports: a device that installs only the runtime imports it too.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout export/ and runtime/ sit beside craft/ (setup.py maps them to
# craft.export / craft.runtime). When this package is imported straight from the checkout -
# `python -m craft.train` or `torchrun -m craft.train` in the repo root put the checkout
# first on sys.path - let the submodule search see those folders too. An installed wheel
# has craft/runtime/ itself and skips this.
_source_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "runtime").is_dir() and (_source_root / "runtime" / "artifact.py").is_file():
    __path__.append(str(_source_root))
