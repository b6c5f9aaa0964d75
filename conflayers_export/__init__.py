"""conflayers-export: ConfLayers layer-skip self-speculative decoding, from calibration to ONNX.

Heavy dependencies (torch, transformers) load only when a submodule that needs them is imported,
so importing this package and running ``conflayers-export --help`` stay fast.
"""

__version__ = "0.1.0"
