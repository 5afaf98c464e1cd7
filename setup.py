"""One distribution, three packages mapped into the `craft.*` namespace.

    craft/    -> craft           training side (torch)
    export/   -> craft.export    compiler (torch + onnx)
    runtime/  -> craft.runtime   on-device runtime (numpy + onnxruntime + sentencepiece + jinja2 + tokenizers)
    configs/  -> craft/configs   presets and device profiles (data, no code): beside runtime/ in
                                 both layouts, where config.py and runtime/estimate.py look

The base install is the runtime alone, what a device needs; `[train]` adds the training and
export stack, `[dev]` the test and benchmark tools.
"""

import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "craft" / "__init__.py").read_text()).group(1)

setup(
    name="craft",
    version=VERSION,
    description="Edge-first model compiler and on-device runtime for small Llama-style models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["craft", "craft.export", "craft.runtime", "craft.configs"],
    package_dir={"craft": "craft", "craft.export": "export", "craft.runtime": "runtime", "craft.configs": "configs"},
    package_data={
        "craft.configs": ["*.yaml", "devices/*.yaml"],
        "craft.export": ["perplexity_text.txt"],
    },  # the int8 quality check of imported models
    install_requires=[
        "numpy>=1.24",
        # No onnxruntime wheel exists for 32-bit ARM: there the numpy backend runs alone.
        # 1.23: the first whose MatMulNBits runs 8 bits (int8 files) on aarch64 too (1.22.1 does on x86_64 only,
        # refusing 8 bits on emulated Cortex-A53); 1.21 runs int4 only, 1.20 neither
        # (x86_64, tested).
        'onnxruntime>=1.23; platform_machine != "armv7l" and platform_machine != "armv6l"',
        "sentencepiece>=0.1.97",  # Debian bookworm's python3-sentencepiece; tested under emulation
        "click>=8.0",
        # Chat templates of imported models render in its sandbox; 3.1.6 fixed the last known sandbox escape.
        "jinja2>=3.1.6",
        # Hugging Face tokenizer.json encoding. PyPI has wheels for x86_64, aarch64 and armv7l (manylinux2014)
        # but none for armv6l (Pi 1, Zero): there craft.runtime.bpe_tokenizer's pure-Python path gives the same ids.
        # >= 0.20 reads merges written as pairs.
        'tokenizers>=0.20; platform_machine != "armv6l"',
    ],
    extras_require={
        # torch: install `torch==2.13.0` (the CPU build) first; this range is then already met.
        # gguf: craft-export reads .gguf sources with it (and its dequantization routines).
        "train": ["torch>=2.4", "onnx>=1.16", "pyyaml>=6.0", "tqdm>=4.60", "gguf>=0.10"],
        # matplotlib and tensorboard are optional for users; the tests exercise both. transformers
        # (+ accelerate for its GGUF loader) is the reference the import tests compare against.
        # onnxruntime-genai (+ onnx-ir, which its model builder imports): the benchmarks' peer
        # (benchmarks/genai_peer.py).
        "dev": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "ruff==0.17.6",
            "matplotlib>=3.5",
            "tensorboard>=2.10",
            "transformers>=4.56",
            "accelerate>=0.26",
            'onnxruntime-genai>=0.18; platform_machine == "x86_64" or platform_machine == "AMD64"',
            "onnx-ir",
        ],
        "plot": ["matplotlib>=3.5"],
        "tensorboard": ["tensorboard>=2.10"],
    },
    entry_points={
        "console_scripts": [
            "craft-train=craft.entry:train",
            "craft-export=craft.entry:export",
            "craft-run=craft.entry:run",
        ]
    },
)
