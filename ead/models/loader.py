"""Checkpoint tensors -> our parameter names, with shape checks.

It owns the mapping from a transformers Llama-family model's state_dict to `Transformer`'s parameters,
fusing q/k/v into `wqkv` and gate/up into `w13`. It leaves fetching and building the HF model to the
caller and all the math to transformer.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ead.errors import ModelLoadError
from ead.models.transformer import ModelArgs, Transformer, rope_inv_freq


def convert_hf_state_dict(hf: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Map transformers names (`model.layers.0.self_attn.q_proj.weight`, ...) to ours, fusing projections.

    Every HF tensor is checked against the shape `args` implies before it is fused, so an error names the
    checkpoint's tensor; a tensor we would ignore (say an o_proj bias) is an error too, not a silent drop.
    """
    used: set[str] = set()

    def take(name: str, *shape: int) -> Tensor:
        if name not in hf:
            raise ModelLoadError(f"checkpoint lacks tensor {name!r} (expected shape {shape}); "
                                 "is it a transformers Llama/Qwen2/Qwen3/Mistral causal LM?")
        if tuple(hf[name].shape) != shape:
            raise ModelLoadError(f"checkpoint tensor {name!r} has shape {tuple(hf[name].shape)}, expected {shape} "
                                 "from its config; the weights and config.json do not belong together.")
        used.add(name)
        return hf[name]

    a = args
    q_dim, kv_dim, ffn_dim = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.intermediate_size
    out = {"tok_embeddings.weight": take("model.embed_tokens.weight", a.vocab_size, a.dim),
           "norm.weight": take("model.norm.weight", a.dim)}
    if a.tie_word_embeddings:
        used.add("lm_head.weight")  # transformers lists the tied tensor under both names
        out["output.weight"] = out["tok_embeddings.weight"]
    else:
        out["output.weight"] = take("lm_head.weight", a.vocab_size, a.dim)
    for i in range(a.n_layers):
        hf_attn, hf_mlp, ours = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", f"layers.{i}."
        out[ours + "attention.wqkv.weight"] = torch.cat([take(hf_attn + "q_proj.weight", q_dim, a.dim),
                                                         take(hf_attn + "k_proj.weight", kv_dim, a.dim),
                                                         take(hf_attn + "v_proj.weight", kv_dim, a.dim)])
        if a.qkv_bias:
            out[ours + "attention.wqkv.bias"] = torch.cat([take(hf_attn + "q_proj.bias", q_dim),
                                                           take(hf_attn + "k_proj.bias", kv_dim),
                                                           take(hf_attn + "v_proj.bias", kv_dim)])
        out[ours + "attention.wo.weight"] = take(hf_attn + "o_proj.weight", a.dim, q_dim)
        if a.qk_norm:
            out[ours + "attention.q_norm.weight"] = take(hf_attn + "q_norm.weight", a.head_dim)
            out[ours + "attention.k_norm.weight"] = take(hf_attn + "k_norm.weight", a.head_dim)
        out[ours + "feed_forward.w13.weight"] = torch.cat([take(hf_mlp + "gate_proj.weight", ffn_dim, a.dim),
                                                           take(hf_mlp + "up_proj.weight", ffn_dim, a.dim)])
        out[ours + "feed_forward.w2.weight"] = take(hf_mlp + "down_proj.weight", a.dim, ffn_dim)
        out[ours + "attention_norm.weight"] = take(f"model.layers.{i}.input_layernorm.weight", a.dim)
        out[ours + "ffn_norm.weight"] = take(f"model.layers.{i}.post_attention_layernorm.weight", a.dim)
    unused = sorted(set(hf) - used)
    if unused:
        raise ModelLoadError(f"checkpoint tensors {unused[:5]} ({len(unused)} in all) have no place in ead's "
                             "decoder; the model has a feature ead does not implement.")
    return out


def load_native(hf_model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> Transformer:
    """Our `Transformer` with the weights of a transformers causal LM, cast to `dtype` on `device`, in eval mode.

    Unfused tensors already of that dtype and device are shared with `hf_model`, not copied.
    """
    args = ModelArgs.from_hf_config(hf_model.config)
    state = {name: t.detach().to(device=device, dtype=dtype) for name, t in
             convert_hf_state_dict(hf_model.state_dict(), args).items()}
    with torch.device("meta"):  # no random init of weights we are about to replace
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_word_embeddings:  # assign=True gave output and embeddings separate tensors
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(args).to(device)  # a non-persistent buffer: meta until now, and float32
    return model.eval()
