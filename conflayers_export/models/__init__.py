"""Model sources: packaged names, GGUF files and Hugging Face folders, behind one resolver."""

from .loader import CACHE_ENV, LoadedModel, cache_dir, load_model
from .packaged import PACKAGED, PackagedModel

__all__ = ["CACHE_ENV", "PACKAGED", "LoadedModel", "PackagedModel", "cache_dir", "load_model"]
