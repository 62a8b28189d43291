"""Config translation for the non-rotary families: bloom (ALiBi), gpt-2 and opt (learned positions)."""

from __future__ import annotations

from typing import Any

from llm.convert.configs.common import _g, _ids, refuse
from llm.convert.configs.rotary import _llama_fused_check


# --------------------------------------------------------------------------------------------------
# bloom / gpt-2 / opt
# --------------------------------------------------------------------------------------------------
def bloom_to_paddle(hf: dict[str, Any]) -> dict[str, Any]:
    if not hf.get("tie_word_embeddings", True):
        refuse(
            "bloom",
            "tie_word_embeddings=false, but paddlenlp BloomForCausalLM always ties lm_head to the embedding",
        )
    return dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf.get("hidden_size", hf.get("n_embed"))),
        n_layer=int(hf.get("n_layer", hf.get("num_hidden_layers"))),
        n_head=int(hf.get("n_head", hf.get("num_attention_heads"))),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        apply_residual_connection_post_layernorm=bool(
            hf.get("apply_residual_connection_post_layernorm", False)
        ),
        hidden_dropout=float(hf.get("hidden_dropout", 0.0)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        pretraining_tp=int(hf.get("pretraining_tp", 1)),
        slow_but_exact=bool(hf.get("slow_but_exact", False)),
        tie_word_embeddings=True,
        **_ids(hf),
    )


def bloom_to_hf(cfg: Any) -> dict[str, Any]:
    return dict(
        architectures=["BloomForCausalLM"],
        model_type="bloom",
        vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.hidden_size),
        n_layer=int(cfg.n_layer),
        n_head=int(cfg.n_head),
        layer_norm_epsilon=float(_g(cfg, "layer_norm_epsilon", 1e-5)),
        initializer_range=float(_g(cfg, "initializer_range", 0.02)),
        apply_residual_connection_post_layernorm=bool(
            _g(cfg, "apply_residual_connection_post_layernorm", False)
        ),
        hidden_dropout=float(_g(cfg, "hidden_dropout", 0.0)),
        attention_dropout=float(_g(cfg, "attention_dropout", 0.0)),
        pretraining_tp=int(_g(cfg, "pretraining_tp", 1)),
        slow_but_exact=bool(_g(cfg, "slow_but_exact", False)),
        tie_word_embeddings=True,
        use_cache=True,
        **_ids(cfg),
    )


_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


def gpt2_to_paddle(hf: dict[str, Any]) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GELU_TANH:
        refuse("gpt2", f"activation_function '{act}' is not supported (paddlenlp GPT uses the tanh GELU)")
    if not hf.get("tie_word_embeddings", True):
        refuse(
            "gpt2",
            "tie_word_embeddings=false, but paddlenlp GPTForCausalLM always ties lm_head to the embedding",
        )
    if float(hf.get("layer_norm_epsilon", 1e-5)) != 1e-5:
        refuse("gpt2", f"layer_norm_epsilon={hf['layer_norm_epsilon']} (paddlenlp GPT hard-codes 1e-5)")
    for key, bad in (
        ("scale_attn_by_inverse_layer_idx", True),
        ("scale_attn_weights", False),
        ("add_cross_attention", True),
    ):
        if hf.get(key, not bad) == bad:
            refuse("gpt2", f"{key}={bad} is not implemented by paddlenlp 2.8.1 GPT")
    hidden = int(hf.get("n_embd", hf.get("hidden_size")))
    positions = int(hf.get("n_positions", hf.get("max_position_embeddings", 1024)))
    return dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        num_hidden_layers=int(hf.get("n_layer", hf.get("num_hidden_layers"))),
        num_attention_heads=int(hf.get("n_head", hf.get("num_attention_heads"))),
        intermediate_size=int(hf.get("n_inner") or 4 * hidden),
        hidden_activation="gelu",
        hidden_dropout_prob=float(hf.get("resid_pdrop", 0.1)),
        attention_probs_dropout_prob=float(hf.get("attn_pdrop", 0.1)),
        max_position_embeddings=positions,
        seq_length=positions,
        initializer_range=float(hf.get("initializer_range", 0.02)),
        normalize_before=True,
        ignore_index=-100,
        tie_word_embeddings=True,
        **_ids(hf),
    )


def gpt2_to_hf(cfg: Any) -> dict[str, Any]:
    if _g(cfg, "hidden_activation", "gelu") != "gelu" or not _g(cfg, "normalize_before", True):
        refuse("gpt", "only pre-LayerNorm GPT with the tanh GELU maps onto Hugging Face GPT-2")
    if float(_g(cfg, "scale_qk_coeff", 1.0)) != 1.0:
        refuse("gpt", "scale_qk_coeff != 1 has no GPT-2 equivalent")
    _llama_fused_check("gpt", cfg)
    return dict(
        architectures=["GPT2LMHeadModel"],
        model_type="gpt2",
        vocab_size=int(cfg.vocab_size),
        n_embd=int(cfg.hidden_size),
        n_layer=int(cfg.num_hidden_layers),
        n_head=int(cfg.num_attention_heads),
        n_inner=int(cfg.intermediate_size),
        n_positions=int(cfg.max_position_embeddings),
        activation_function="gelu_new",
        resid_pdrop=float(_g(cfg, "hidden_dropout_prob", 0.1)),
        embd_pdrop=float(_g(cfg, "hidden_dropout_prob", 0.1)),
        attn_pdrop=float(_g(cfg, "attention_probs_dropout_prob", 0.1)),
        layer_norm_epsilon=1e-5,
        initializer_range=float(_g(cfg, "initializer_range", 0.02)),
        scale_attn_weights=True,
        tie_word_embeddings=True,
        use_cache=True,
        **_ids(cfg),
    )


def opt_to_paddle(hf: dict[str, Any]) -> dict[str, Any]:
    act = hf.get("activation_function", "relu")
    if act == "gelu":
        refuse(
            "opt",
            "activation_function 'gelu' (exact) is not available (paddlenlp OPT's 'gelu' is the tanh form)",
        )
    if hf.get("_remove_final_layer_norm"):
        refuse("opt", "_remove_final_layer_norm=true is not implemented by paddlenlp 2.8.1 OPT")
    if not hf.get("layer_norm_elementwise_affine", True):
        refuse("opt", "layer_norm_elementwise_affine=false is not implemented by paddlenlp 2.8.1 OPT")
    hidden = int(hf["hidden_size"])
    proj = int(hf.get("word_embed_proj_dim") or hidden)
    if proj != hidden:
        refuse(
            "opt",
            f"word_embed_proj_dim={proj} != hidden_size (paddlenlp 2.8.1 OPT's lm_head has the wrong shape)",
        )
    return dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        num_hidden_layers=int(hf["num_hidden_layers"]),
        intermediate_size=int(hf.get("ffn_dim", 4 * hidden)),
        num_attention_heads=int(hf["num_attention_heads"]),
        hidden_act="gelu" if act in _GELU_TANH else act,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        normalize_before=bool(hf.get("do_layer_norm_before", True)),
        word_embed_proj_dim=proj,
        hidden_dropout_prob=float(hf.get("dropout", 0.1)),
        attention_probs_dropout_prob=float(hf.get("attention_dropout", 0.0)),
        initializer_range=float(hf.get("init_std", 0.02)),
        enable_bias=bool(hf.get("enable_bias", True)),
        tie_word_embeddings=False,
        **_ids(hf),
    )


def opt_to_hf(cfg: Any) -> dict[str, Any]:
    act = _g(cfg, "hidden_act", "relu")
    return dict(
        architectures=["OPTForCausalLM"],
        model_type="opt",
        vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.hidden_size),
        num_hidden_layers=int(cfg.num_hidden_layers),
        ffn_dim=int(cfg.intermediate_size),
        num_attention_heads=int(cfg.num_attention_heads),
        activation_function="gelu_new" if act == "gelu" else act,
        max_position_embeddings=int(cfg.max_position_embeddings),
        do_layer_norm_before=bool(_g(cfg, "normalize_before", True)),
        word_embed_proj_dim=int(_g(cfg, "word_embed_proj_dim", cfg.hidden_size)),
        dropout=float(_g(cfg, "hidden_dropout_prob", 0.1)),
        attention_dropout=float(_g(cfg, "attention_probs_dropout_prob", 0.0)),
        init_std=float(_g(cfg, "initializer_range", 0.02)),
        enable_bias=bool(_g(cfg, "enable_bias", True)),
        layer_norm_elementwise_affine=True,
        tie_word_embeddings=False,
        use_cache=True,
        **_ids(cfg),
    )
