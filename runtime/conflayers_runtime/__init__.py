"""conflayers-runtime: lossless layer-skip self-speculative decoding without torch.

Public surface: the manifest schema, the sampling/acceptance rules and the decoding loop.
"""

try:
    import onnxruntime  # noqa: F401  (provided by either distribution)
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError(
        "conflayers-runtime needs ONNX Runtime: pip install 'conflayers-runtime[cpu]' for the CPU or "
        "'conflayers-runtime[cuda]' for CUDA (onnxruntime-gpu; never both distributions together)"
    ) from exc

from .errors import (
    ConflayersError,
    CostTableError,
    DeviceError,
    GenerationError,
    ManifestError,
    SessionOptionError,
    SkipSetError,
)
from .lookup import LookupConfig
from .manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Artifacts,
    Draft,
    Lookup,
    Manifest,
    ModelIdentity,
    Task,
    VocabularyRanking,
    check_skip_layers,
    read_manifest,
    write_manifest,
)
from .model import DEFAULT_TASK_DRAFT, GenerationResult, Model, load
from .sampling import SamplingConfig
from .speculative import Backend, DraftConfig, GenerationStats, SpeedGuard, generate, stream
from .tree import TreeConfig

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TASK_DRAFT",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "Artifacts",
    "Backend",
    "ConflayersError",
    "CostTableError",
    "DeviceError",
    "Draft",
    "DraftConfig",
    "GenerationError",
    "GenerationResult",
    "GenerationStats",
    "Lookup",
    "LookupConfig",
    "Model",
    "SpeedGuard",
    "Manifest",
    "ManifestError",
    "ModelIdentity",
    "SamplingConfig",
    "SessionOptionError",
    "SkipSetError",
    "Task",
    "TreeConfig",
    "VocabularyRanking",
    "check_skip_layers",
    "generate",
    "load",
    "read_manifest",
    "stream",
    "write_manifest",
]
