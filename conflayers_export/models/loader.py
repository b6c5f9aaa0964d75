"""One resolver behind every ``--model`` option.

Accepted: a packaged name (see :data:`PACKAGED`), a ``.gguf`` file, or a local Hugging Face
folder (with ``config.json``). A GGUF is dequantized once by transformers (20-50 s) and cached as
a plain safetensors model, keyed by the GGUF's sha256, under ``$CONFLAYERS_CACHE`` (default
``~/.cache/conflayers``); later loads take a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conflayers_runtime.artifact import file_sha256
from conflayers_runtime.manifest import ModelIdentity

from ..errors import ModelSourceError
from .architectures import Architecture, get_architecture
from .packaged import PACKAGED, packaged_gguf

log = logging.getLogger(__name__)
CACHE_ENV = "CONFLAYERS_CACHE"
CACHE_FORMAT = 2  # bump when the converted folder's content changes, so stale caches are not reused


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "conflayers")


REFERENCE_DTYPES = ("float32", "float16", "bfloat16")


class StreamedWeights:
    """The parameters of a model built on PyTorch's meta device (structure only, no storage),
    read from its safetensors files one tensor at a time: a build then holds one tensor in memory,
    not the model (a 7B model in float32 is 28 GB)."""

    def __init__(self, model: object, folder: Path):
        from safetensors import safe_open

        # Tied parameters are one object and appear once, under the name the files store them by.
        self.names = {id(p): name for name, p in model.named_parameters()}  # type: ignore[attr-defined]
        self.files: dict[str, Path] = {}  # tensor name -> its file
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                self.files.update(dict.fromkeys(handle.keys(), path))
        missing = sorted(set(self.names.values()) - set(self.files))
        if missing:
            raise ModelSourceError(
                f"{folder}'s safetensors files lack {len(missing)} of the model's parameters (e.g. "
                f"{missing[0]}): re-save the model with transformers' save_pretrained"
            )

    def read(self, tensor: object) -> np.ndarray:
        from safetensors import safe_open

        name = self.names.get(id(tensor))
        if name is None:
            raise ModelSourceError("a streamed model's tensor is not one of its parameters (a bug)")
        # Opened per tensor: an open file stays memory-mapped, and every page read through the map
        # would stay resident in this process (measured: the whole model by the end of a build).
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name).float().numpy()


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel in eval mode: float32, or structure only (streamed)
    tokenizer: object  # transformers tokenizer
    architecture: Architecture
    identity: ModelIdentity
    folder: Path  # Hugging Face-format folder the model was loaded from (config, weights, tokenizer)
    streamed: StreamedWeights | None = None  # set when the model's weights stay in its files

    def array(self, tensor: object) -> np.ndarray:
        """A parameter's (or a computed tensor's) values as a float32 array."""
        if getattr(tensor, "is_meta", False):
            assert self.streamed is not None, "a meta tensor outside a streamed model"
            return self.streamed.read(tensor)
        return tensor.detach().float().numpy()  # type: ignore[attr-defined]

    def encode(self, text: str | list[dict[str, str]], chat: bool = True) -> list[int]:
        """Token ids of a prompt: text (``chat`` wraps it as one user turn with the model's chat
        template) or a list of chat messages."""
        if isinstance(text, list) or (chat and getattr(self.tokenizer, "chat_template", None)):
            messages = text if isinstance(text, list) else [{"role": "user", "content": text}]
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_dict=True
            )
            return list(encoded["input_ids"])
        return list(self.tokenizer(text)["input_ids"])

    @property
    def stop_token_ids(self) -> list[int]:
        """End-of-sequence ids from the generation config and the tokenizer."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def reference_model(
        self, device: str = "cpu", dtype: str = "float32", device_map: str | None = None
    ) -> object:
        """The model for the PyTorch reference decoder and the layer profiles on ``device`` in
        ``dtype`` (REFERENCE_DTYPES): this float32 CPU model itself by default (unless it is
        streamed: structure only), else loaded again from the folder, e.g. on CUDA in float16, or
        spread over several GPUs with accelerate's ``device_map`` ("auto"). Graphs are built from
        this model's float32 values (streamed or in memory), whatever the reference's dtype."""
        import torch
        from transformers import AutoModelForCausalLM

        if dtype not in REFERENCE_DTYPES:
            raise ModelSourceError(f"reference dtype {dtype!r}: use one of {', '.join(REFERENCE_DTYPES)}")
        if device == "cpu" and dtype == "float32" and device_map is None and self.streamed is None:
            return self.model
        model = AutoModelForCausalLM.from_pretrained(
            self.folder, dtype=getattr(torch, dtype), device_map=device_map or device
        )
        return model.eval()


def load_model(spec: str, streamed: bool = False) -> LoadedModel:
    """Resolve ``spec`` and load the model in float32 for the CPU; ``streamed``: only its structure,
    its weights read from its safetensors files when asked for (LoadedModel.array; what ``build``
    needs, not what runs the model), where the folder has safetensors files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the library reports through `logging`, not progress bars
    folder, fingerprint = _resolve(spec)
    config = AutoConfig.from_pretrained(folder)
    architecture = get_architecture(config.model_type)  # fail before loading weights
    weights = None
    if streamed and any(folder.glob("*.safetensors")):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config).eval()
        # RoPE tables are computed, not stored: that module is rebuilt on the CPU (it is tiny).
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        weights = StreamedWeights(model, folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    identity = ModelIdentity(
        source=spec,
        architecture=config.model_type,
        num_layers=config.num_hidden_layers,
        fingerprint=fingerprint,
    )
    return LoadedModel(model, tokenizer, architecture, identity, folder, weights)


def _resolve(spec: str) -> tuple[Path, str]:
    """(Hugging Face folder, weights fingerprint) for a --model value."""
    if spec in PACKAGED:  # hash-checked by packaged_gguf: its digest is the known one
        return _from_gguf(packaged_gguf(PACKAGED[spec], cache_dir()), PACKAGED[spec].sha256)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path, _folder_fingerprint(path)
    if path.exists():
        raise ModelSourceError(
            f"{spec} is neither a .gguf file nor a folder with config.json: point --model at one of those"
        )
    names = ", ".join(PACKAGED)
    raise ModelSourceError(
        f"unknown model {spec!r}: no such file or folder, and not a packaged name ({names})"
    )


def _folder_fingerprint(folder: Path) -> str:
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise ModelSourceError(f"{folder} has config.json but no .safetensors or .bin weights")
    digest = hashlib.sha256()
    for p in weights:
        digest.update(p.name.encode())
        digest.update(file_sha256(p).encode())
    return "sha256:" + digest.hexdigest()


def _from_gguf(gguf: Path, sha: str | None = None) -> tuple[Path, str]:
    sha = sha or file_sha256(gguf)
    target = cache_dir() / "models" / f"{sha[:24]}-v{CACHE_FORMAT}"
    if not (target / "source.json").is_file():
        _convert_gguf(gguf, sha, target)
    return target, "sha256:" + sha


def _convert_gguf(gguf: Path, sha: str, target: Path) -> None:
    """Dequantize a GGUF to a plain float32 safetensors folder, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached in %s)", gguf.name, target)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for unreadable GGUFs
        raise ModelSourceError(f"cannot read {gguf} as a GGUF model ({exc}); check the file") from exc
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config. The weights
    # are dequantized now, so the config must not claim a GGUF quantization (other tools refuse it).
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": sha}) + "\n")
        if target.exists() and not (target / "source.json").is_file():
            shutil.rmtree(target)  # an older, incomplete conversion
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "source.json").is_file():  # else another process converted it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
