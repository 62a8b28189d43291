"""Config translation for the rotary-embedding families: llama, qwen2, mixtral, qwen (v1) and chatglm2/3."""

from __future__ import annotations

from typing import Any

from llm.convert.configs.common import _expect, _g, _ids, refuse


# --------------------------------------------------------------------------------------------------
# llama / qwen2 / mixtral
# --------------------------------------------------------------------------------------------------
def _rope_to_paddle(family: str, hf: dict[str, Any]) -> dict[str, Any]:
    scaling = hf.get("rope_scaling")
    out: dict[str, Any] = {"rope_theta": float(hf.get("rope_theta", 10000.0))}
    if not scaling:
        return out
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind in (None, "default"):
        return out
    if kind == "linear":
        out.update(rope_scaling_type="linear", rope_scaling_factor=factor)
    elif kind == "dynamic":
        out.update(rope_scaling_type="dynamic_ntk", rope_scaling_factor=factor)
    else:
        refuse(
            family,
            f"rope_scaling type '{kind}' is not implemented by paddlenlp 2.8.1 (only linear and dynamic)",
        )
    return out


def _llama_common(family: str, hf: dict[str, Any]) -> dict[str, Any]:
    _expect(family, hf, "hidden_act", ("silu",), "is not supported (paddlenlp llama always uses SiLU)")
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim and int(head_dim) * heads != int(hf["hidden_size"]):
        refuse(
            family,
            f"head_dim={head_dim} differs from hidden_size/num_attention_heads (paddlenlp 2.8.1 derives it)",
        )
    max_pos = int(hf.get("max_position_embeddings", 2048))
    out = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        max_position_embeddings=max_pos,
        seq_length=max_pos,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        tie_word_embeddings=False,  # the converter writes lm_head explicitly
        use_cache=True,
        **_ids(hf),
    )
    return out


def _llama_with_rope(name: str, hf: dict[str, Any]) -> dict[str, Any]:
    out = _llama_common(name, hf)
    out.update(_rope_to_paddle(name, hf))
    return out


def llama_to_paddle(hf: dict[str, Any]) -> dict[str, Any]:
    return _llama_with_rope("llama", hf)


def qwen2_to_paddle(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("use_sliding_window"):
        refuse("qwen2", "use_sliding_window=true is not implemented by paddlenlp 2.8.1 llama")
    return _llama_with_rope("qwen2", hf)


def mixtral_to_paddle(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("rope_scaling"):
        refuse("mixtral", "rope_scaling is not implemented by paddlenlp 2.8.1 mixtral")
    out = _llama_common("mixtral", hf)
    out.update(
        rope_theta=float(hf.get("rope_theta", 1e6)),
        num_local_experts=int(hf["num_local_experts"]),
        num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        output_router_logits=False,
        sliding_window=hf.get("sliding_window"),
    )
    return out


def _rope_to_hf(cfg: Any) -> tuple[float, dict[str, Any] | None, int]:
    theta = float(_g(cfg, "rope_theta", 10000.0))
    kind = _g(cfg, "rope_scaling_type")
    factor = float(_g(cfg, "rope_scaling_factor", 1.0))
    max_pos = int(cfg.max_position_embeddings)
    if not kind:
        return theta, None, max_pos
    if kind == "linear":
        return theta, {"type": "linear", "rope_type": "linear", "factor": factor}, max_pos
    if kind == "dynamic_ntk":
        return theta, {"type": "dynamic", "rope_type": "dynamic", "factor": factor}, max_pos
    if kind == "ntk":  # static NTK == a larger rope_theta over a longer context
        dim = int(cfg.hidden_size) // int(cfg.num_attention_heads)
        return theta * factor ** (dim / (dim - 2)), None, int(max_pos * factor)
    refuse("llama", f"rope_scaling_type '{kind}' has no Hugging Face equivalent")
    raise AssertionError  # unreachable


def _llama_fused_check(family: str, cfg: Any) -> None:
    for flag in ("fuse_attention_qkv", "fuse_attention_ffn", "alibi"):
        if _g(cfg, flag, False):
            refuse(
                family,
                f"{flag}=true has no Hugging Face {family} equivalent; re-save the model with {flag}=false",
            )


def llama_to_hf(cfg: Any) -> dict[str, Any]:
    _llama_fused_check("llama", cfg)
    theta, scaling, max_pos = _rope_to_hf(cfg)
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.hidden_size),
        intermediate_size=int(cfg.intermediate_size),
        num_hidden_layers=int(cfg.num_hidden_layers),
        num_attention_heads=int(cfg.num_attention_heads),
        num_key_value_heads=int(_g(cfg, "num_key_value_heads", cfg.num_attention_heads)),
        hidden_act="silu",
        max_position_embeddings=max_pos,
        initializer_range=float(_g(cfg, "initializer_range", 0.02)),
        rms_norm_eps=float(_g(cfg, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        use_cache=True,
        **_ids(cfg),
    )


def mixtral_to_hf(cfg: Any) -> dict[str, Any]:
    out = llama_to_hf(cfg)
    for key in ("rope_scaling", "attention_bias", "mlp_bias"):
        out.pop(key)
    out.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        rope_theta=float(_g(cfg, "rope_theta", 1e6)),
        num_local_experts=int(cfg.num_local_experts),
        num_experts_per_tok=int(cfg.num_experts_per_tok),
        router_aux_loss_coef=float(_g(cfg, "router_aux_loss_coef", 0.001)),
        output_router_logits=False,
        sliding_window=_g(cfg, "sliding_window"),
    )
    return out


# --------------------------------------------------------------------------------------------------
# qwen (v1, remote code) and chatglm2/3 (remote code)
# --------------------------------------------------------------------------------------------------
_QWEN_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_channels",
    "intermediate_size",
    "max_position_embeddings",
    "rotary_pct",
    "rotary_emb_base",
    "use_dynamic_ntk",
    "use_logn_attn",
    "layer_norm_epsilon",
    "no_bias",
    "initializer_range",
    "emb_dropout_prob",
    "attn_dropout_prob",
)


def qwen_to_paddle(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("use_cache_quantization"):
        refuse("qwen", "use_cache_quantization=true is not implemented by paddlenlp 2.8.1")
    out = {k: hf[k] for k in _QWEN_KEYS if k in hf}
    out["seq_length"] = int(hf.get("seq_length", hf.get("max_position_embeddings", 8192)))
    out["tie_word_embeddings"] = False
    out.update(_ids(hf))
    return out


def qwen_to_hf(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(cfg, k) for k in _QWEN_KEYS if getattr(cfg, k, None) is not None}
    out.update(
        architectures=["QWenLMHeadModel"],
        model_type="qwen",
        auto_map={
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        seq_length=int(_g(cfg, "seq_length", cfg.max_position_embeddings)),
        scale_attn_weights=True,
        tie_word_embeddings=False,
        use_cache_quantization=False,
        use_flash_attn=False,
        **_ids(cfg),
    )
    return out


def is_chatglm_v1(hf: dict[str, Any]) -> bool:
    return "inner_hidden_size" in hf or "position_encoding_2d" in hf


def chatglm2_to_paddle(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("quantization_level") not in (None, 0):
        refuse(
            "chatglm2",
            f"quantization_level={hf['quantization_level']} (int4/int8 weights) cannot be converted",
        )
    if hf.get("pre_seq_len") is not None:
        refuse(
            "chatglm2",
            "pre_seq_len is set (a P-tuning v2 checkpoint); paddlenlp 2.8.1 has no such prefix encoder",
        )
    if float(hf.get("rope_ratio", 1) or 1) != 1.0:
        refuse(
            "chatglm2",
            f"rope_ratio={hf['rope_ratio']} (long-context variant) is not implemented by paddlenlp 2.8.1",
        )
    heads = int(hf["num_attention_heads"])
    groups = int(hf.get("multi_query_group_num", 1)) if hf.get("multi_query_attention") else heads
    seq = int(hf.get("seq_length", 2048))
    out = dict(
        num_hidden_layers=int(hf.get("num_layers", hf.get("num_hidden_layers"))),
        vocab_size=int(hf.get("padded_vocab_size", hf.get("vocab_size"))),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["ffn_hidden_size"]),
        kv_channels=int(hf.get("kv_channels") or int(hf["hidden_size"]) // heads),
        num_attention_heads=heads,
        max_sequence_length=seq,
        layernorm_epsilon=float(hf.get("layernorm_epsilon", 1e-5)),
        rmsnorm=bool(hf.get("rmsnorm", True)),
        apply_residual_connection_post_layernorm=bool(
            hf.get("apply_residual_connection_post_layernorm", False)
        ),
        post_layer_norm=bool(hf.get("post_layer_norm", True)),
        add_bias_linear=bool(hf.get("add_bias_linear", False)),
        add_qkv_bias=bool(hf.get("add_qkv_bias", False)),
        multi_query_attention=True,
        multi_query_group_num=groups,
        apply_query_key_layer_scaling=bool(hf.get("apply_query_key_layer_scaling", True)),
        attention_softmax_in_fp32=bool(hf.get("attention_softmax_in_fp32", True)),
        fp32_residual_connection=bool(hf.get("fp32_residual_connection", False)),
        hidden_dropout=float(hf.get("hidden_dropout", 0.0)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        tie_word_embeddings=False,
        **_ids(hf),
    )
    if out["kv_channels"] * heads != out["hidden_size"]:
        refuse(
            "chatglm2", "kv_channels * num_attention_heads != hidden_size (paddlenlp 2.8.1 requires equality)"
        )
    return out


def chatglm2_to_hf(cfg: Any) -> dict[str, Any]:
    return dict(
        architectures=["ChatGLMModel"],
        model_type="chatglm",
        auto_map={
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        num_layers=int(cfg.num_hidden_layers),
        padded_vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.hidden_size),
        ffn_hidden_size=int(cfg.ffn_hidden_size),
        kv_channels=int(cfg.kv_channels),
        num_attention_heads=int(cfg.num_attention_heads),
        seq_length=int(cfg.max_sequence_length),
        hidden_dropout=float(_g(cfg, "hidden_dropout", 0.0)),
        attention_dropout=float(_g(cfg, "attention_dropout", 0.0)),
        layernorm_epsilon=float(_g(cfg, "layernorm_epsilon", 1e-5)),
        rmsnorm=bool(_g(cfg, "rmsnorm", True)),
        apply_residual_connection_post_layernorm=bool(
            _g(cfg, "apply_residual_connection_post_layernorm", False)
        ),
        post_layer_norm=bool(_g(cfg, "post_layer_norm", True)),
        add_bias_linear=bool(_g(cfg, "add_bias_linear", False)),
        add_qkv_bias=bool(_g(cfg, "add_qkv_bias", False)),
        bias_dropout_fusion=True,
        multi_query_attention=True,
        multi_query_group_num=int(cfg.multi_query_group_num),
        apply_query_key_layer_scaling=bool(_g(cfg, "apply_query_key_layer_scaling", True)),
        attention_softmax_in_fp32=bool(_g(cfg, "attention_softmax_in_fp32", True)),
        fp32_residual_connection=bool(_g(cfg, "fp32_residual_connection", False)),
        quantization_level=0,
        pre_seq_len=None,
        prefix_projection=False,
        original_rope=True,
        **_ids(cfg),
    )
