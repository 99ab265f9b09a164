"""Turn a model source (a Hugging Face hub id, a local HF folder, or a .gguf file) into a transformers model and
its tokenizer on a device.

A GGUF file is dequantized by transformers' GGUF loader (slow: about a minute for 1.5B parameters on 2 cores),
so the first load saves the float32 result as a safetensors folder under the cache and later loads read that.
Which model pairs with which, and whether their tokenizers agree, is `ead.pair`'s business.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ead.errors import ModelLoadError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
USAGE = ("Pass a Hugging Face hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct), a local folder holding config.json and "
         "*.safetensors, or a .gguf file.")


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run. `source` is what the user passed; `path` the folder actually loaded (for a GGUF,
    its converted copy); `params` the number of parameters, which the paper's cost ratio uses."""

    source: str
    path: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    params: int


def load_model(source: str, device: torch.device, dtype: torch.dtype, cache_root: Path) -> LoadedModel:
    """Load one model and its tokenizer; raise ModelLoadError with the fix when that is impossible."""
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {source!r} does not exist. {USAGE}")
        folder = convert_gguf(path, cache_root)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{source!r} has no config.json, so it is not a Hugging Face model folder. {USAGE}")
        folder = path
    elif os.sep in source and (source.startswith((".", "~", os.sep)) or not HUB_ID.match(source)):
        raise ModelLoadError(f"{source!r}: no such file or folder. {USAGE}")
    elif HUB_ID.match(source):
        folder = None  # a hub id: transformers fetches or finds it in the HF cache
    else:
        raise ModelLoadError(f"{source!r} is neither an existing path nor a valid hub id. {USAGE}")
    return _load_folder(source, str(folder) if folder else source, device, dtype)


def _load_folder(source: str, where: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    is_hub_id = where == source and not Path(source).exists()
    try:
        if is_hub_id:
            tokenizer, model = _load_from_hub(source, dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(where)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load {source!r}: {reason}. {USAGE}") from e
    model = model.to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    return LoadedModel(source=source, path=where, model=model, tokenizer=tokenizer, params=params)


def _load_from_hub(hub_id: str, dtype: torch.dtype):
    """From the local HF cache if it is there; else from the hub, after checking in seconds that it is
    reachable (an offline machine would otherwise spend a minute in the hub client's retries)."""
    try:
        return (AutoTokenizer.from_pretrained(hub_id, local_files_only=True),
                AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, local_files_only=True))
    except OSError:
        pass
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    if constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT):
        raise ModelLoadError(
            f"{hub_id!r} is not in the local Hugging Face cache and {host} cannot be reached (offline). Download "
            f"it on a machine with network (`hf download {hub_id}`) and pass the local folder, or pass a .gguf file.")
    return (AutoTokenizer.from_pretrained(hub_id), AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype))


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
        return True
    except (OSError, TypeError):
        return False


def convert_gguf(gguf: Path, cache_root: Path) -> Path:
    """Dequantize `gguf` once into a float32 safetensors folder under cache_root/converted and return it.

    The folder's name carries a hash of the file's absolute path, size and mtime, so a changed file converts
    again. A conversion killed half-way leaves only a temporary folder, never a folder that looks complete.
    """
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root / "converted" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
        except (OSError, ValueError, ImportError, KeyError) as e:
            raise ModelLoadError(f"could not read GGUF file {str(gguf)!r}: {e}. transformers reads GGUF through "
                                 "the `gguf` package and supports the architectures listed in its docs.") from e
        # The dequantized weights are plain float32; drop the GGUF "quantization" so save_pretrained accepts them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # another process did not finish it either: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
