"""Per-family conversion specs: name rules, config translation, tied-embedding handling.

=============  ===========================  ==========================================================
converter      Hugging Face ``model_type``   paddlenlp 2.8.1 target
=============  ===========================  ==========================================================
llama          llama (LLaMA 1/2/3)           LlamaForCausalLM
qwen2          qwen2                         LlamaForCausalLM, only when the q/k/v biases are all zero
mixtral        mixtral                       MixtralForCausalLM
qwen           qwen (remote code)            QWenForCausalLM
chatglm_v2     chatglm (v2/v3, remote code)  ChatGLMv2ForCausalLM
bloom          bloom                         BloomForCausalLM
gpt            gpt2                          GPTForCausalLM
opt            opt                           OPTForCausalLM
=============  ===========================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm.convert import configs as C
from llm.convert.rules import R, Rule, RuleSet
from llm.errors import ModelError


@dataclass
class ConvSpec:
    """How one family converts. ``embed``/``head`` name the HF tensors tying concerns; ``head_rule`` is the
    paddle lm_head target and op when the head is derived from the embedding."""

    name: str
    family: str
    rules: list[Rule]
    to_paddle: Callable[[dict[str, Any]], dict[str, Any]]
    to_hf: Callable[[Any], dict[str, Any]]
    embed: str
    head: str | None
    head_rule: tuple[str, str] | None
    tie_default: bool = False
    paddle_ties: bool = False
    hf_prefix: str = ""
    ignore_hf: list[str] = field(default_factory=list)
    ignore_pd: list[str] = field(default_factory=list)

    def layers(self, cfg: Any) -> tuple[int, int]:
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
        return int(layers), int(getattr(cfg, "num_local_experts", 0) or 0)

    def normalize_hf(self, name: str) -> str:
        """Add the ``transformer.``/``model.`` prefix that base-model checkpoints leave out."""
        if not self.hf_prefix or name.startswith(self.hf_prefix) or name.startswith("lm_head"):
            return name
        return self.hf_prefix + name

    def ruleset(self, direction: str, tie: bool = False) -> RuleSet:
        """Rules for ``to_pd``/``to_hf``; with ``tie`` the paddle lm_head is derived from the embedding."""
        rules = list(self.rules)
        ignore_hf = list(self.ignore_hf)
        if direction == "to_pd" and tie and self.head_rule and not self.paddle_ties:
            embed_shape = next((r.shape for r in rules if r.hf == self.embed), "")
            rules = [r for r in rules if r.hf != self.head]
            rules.append(R(self.embed, self.head_rule[0], self.head_rule[1], to_hf=False, shape=embed_shape))
        if direction == "to_pd" and (tie or self.paddle_ties) and self.head:
            ignore_hf.append(_esc(self.head))
        return RuleSet(rules, ignore_hf, list(self.ignore_pd))


def _esc(name: str) -> str:
    return name.replace(".", r"\.")


def _llama_rules(pd: str, mixtral: bool = False) -> list[Rule]:
    a = f"{pd}.layers.{{L}}.self_attn"
    rules = [
        R("model.embed_tokens.weight", f"{pd}.embed_tokens.weight", shape="V,H"),
        R("model.norm.weight", f"{pd}.norm.weight", shape="H"),
        R("lm_head.weight", "lm_head.weight", "T", shape="V,H"),
        R("model.layers.{L}.input_layernorm.weight", f"{pd}.layers.{{L}}.input_layernorm.weight", shape="H"),
        R(
            "model.layers.{L}.post_attention_layernorm.weight",
            f"{pd}.layers.{{L}}.post_attention_layernorm.weight",
            shape="H",
        ),
    ]
    for proj, shape in (("q_proj", "H,H"), ("k_proj", "KV,H"), ("v_proj", "KV,H"), ("o_proj", "H,H")):
        rules.append(R(f"model.layers.{{L}}.self_attn.{proj}.weight", f"{a}.{proj}.weight", "T", shape=shape))
        rules.append(Rule(f"model.layers.{{L}}.self_attn.{proj}.bias", (), "zero", to_hf=False))
    mlp = (("gate_proj", "I,H"), ("up_proj", "I,H"), ("down_proj", "H,I"))
    if mixtral:
        moe = "model.layers.{L}.block_sparse_moe"
        rules.append(
            R(f"{moe}.gate.weight", f"{pd}.layers.{{L}}.block_sparse_moe.gate.weight", "T", shape="E,H")
        )
        for w, shape in (("w1", "I,H"), ("w2", "H,I"), ("w3", "I,H")):
            rules.append(
                R(
                    f"{moe}.experts.{{E}}.{w}.weight",
                    f"{pd}.layers.{{L}}.block_sparse_moe.experts.{{E}}.{w}.weight",
                    "T",
                    shape=shape,
                )
            )
    else:
        for proj, shape in mlp:
            rules.append(
                R(
                    f"model.layers.{{L}}.mlp.{proj}.weight",
                    f"{pd}.layers.{{L}}.mlp.{proj}.weight",
                    "T",
                    shape=shape,
                )
            )
            rules.append(Rule(f"model.layers.{{L}}.mlp.{proj}.bias", (), "zero", to_hf=False))
    return rules


def _qwen_rules() -> list[Rule]:
    h, p = "transformer.h.{L}", "qwen.h.{L}"
    bias = lambda c: not getattr(c, "no_bias", True)  # noqa: E731
    return [
        R("transformer.wte.weight", "qwen.wte.weight", shape="V,H"),
        R("transformer.ln_f.weight", "qwen.ln_f.weight", shape="H"),
        R("lm_head.weight", "lm_head.weight", "T", shape="V,H"),
        R(f"{h}.ln_1.weight", f"{p}.ln_1.weight", shape="H"),
        R(f"{h}.ln_2.weight", f"{p}.ln_2.weight", shape="H"),
        R(f"{h}.attn.c_attn.weight", f"{p}.attn.c_attn.weight", "T", shape="3P,H"),
        R(f"{h}.attn.c_attn.bias", f"{p}.attn.c_attn.bias", shape="3P"),
        R(f"{h}.attn.c_proj.weight", f"{p}.attn.c_proj.weight", "T", shape="H,P"),
        R(f"{h}.attn.c_proj.bias", f"{p}.attn.c_proj.bias", when=bias, shape="H"),
        R(f"{h}.mlp.w1.weight", f"{p}.mlp.w1.weight", "T", shape="I2,H"),
        R(f"{h}.mlp.w2.weight", f"{p}.mlp.w2.weight", "T", shape="I2,H"),
        R(f"{h}.mlp.c_proj.weight", f"{p}.mlp.c_proj.weight", "T", shape="H,I2"),
        R(f"{h}.mlp.w1.bias", f"{p}.mlp.w1.bias", when=bias, shape="I2"),
        R(f"{h}.mlp.w2.bias", f"{p}.mlp.w2.bias", when=bias, shape="I2"),
        R(f"{h}.mlp.c_proj.bias", f"{p}.mlp.c_proj.bias", when=bias, shape="H"),
    ]


def _chatglm2_rules() -> list[Rule]:
    h, p = "transformer.encoder.layers.{L}", "chatglm_v2.encoder.layers.{L}"
    qkv_bias = lambda c: bool(getattr(c, "add_qkv_bias", False) or getattr(c, "add_bias_linear", False))  # noqa: E731
    bias = lambda c: bool(getattr(c, "add_bias_linear", False))  # noqa: E731
    final = lambda c: bool(getattr(c, "post_layer_norm", True))  # noqa: E731
    qkv = "self_attention.query_key_value"
    return [
        R(
            "transformer.embedding.word_embeddings.weight",
            "chatglm_v2.embedding.word_embeddings.weight",
            shape="V,H",
        ),
        R(
            "transformer.encoder.final_layernorm.weight",
            "chatglm_v2.encoder.final_layernorm.weight",
            when=final,
            shape="H",
        ),
        R("transformer.output_layer.weight", "chatglm_v2.output_layer.weight", "T", shape="V,H"),
        R(f"{h}.input_layernorm.weight", f"{p}.input_layernorm.weight", shape="H"),
        R(f"{h}.post_attention_layernorm.weight", f"{p}.post_attention_layernorm.weight", shape="H"),
        R(f"{h}.{qkv}.weight", f"{p}.{qkv}.weight", "T", shape="QKV,H"),
        R(f"{h}.{qkv}.bias", f"{p}.{qkv}.bias", when=qkv_bias, shape="QKV"),
        R(f"{h}.self_attention.dense.weight", f"{p}.self_attention.dense.weight", "T", shape="H,H"),
        R(f"{h}.self_attention.dense.bias", f"{p}.self_attention.dense.bias", when=bias, shape="H"),
        R(f"{h}.mlp.dense_h_to_4h.weight", f"{p}.mlp.dense_h_to_4h.weight", "T", shape="2F,H"),
        R(f"{h}.mlp.dense_h_to_4h.bias", f"{p}.mlp.dense_h_to_4h.bias", when=bias, shape="2F"),
        R(f"{h}.mlp.dense_4h_to_h.weight", f"{p}.mlp.dense_4h_to_h.weight", "T", shape="H,F"),
        R(f"{h}.mlp.dense_4h_to_h.bias", f"{p}.mlp.dense_4h_to_h.bias", when=bias, shape="H"),
    ]


def _bloom_rules() -> list[Rule]:
    h, p = "transformer.h.{L}", "bloom.h.{L}"
    rules = [R("transformer.word_embeddings.weight", "bloom.word_embeddings.weight", shape="V,H")]
    for name in ("word_embeddings_layernorm", "ln_f"):
        for kind in ("weight", "bias"):
            rules.append(R(f"transformer.{name}.{kind}", f"bloom.{name}.{kind}", shape="H"))
    for name in ("input_layernorm", "post_attention_layernorm"):
        for kind in ("weight", "bias"):
            rules.append(R(f"{h}.{name}.{kind}", f"{p}.{name}.{kind}", shape="H"))
    for name, out, inp in (
        ("self_attention.query_key_value", "3H", "H"),
        ("self_attention.dense", "H", "H"),
        ("mlp.dense_h_to_4h", "4H", "H"),
        ("mlp.dense_4h_to_h", "H", "4H"),
    ):
        rules.append(R(f"{h}.{name}.weight", f"{p}.{name}.weight", "T", shape=f"{out},{inp}"))
        rules.append(R(f"{h}.{name}.bias", f"{p}.{name}.bias", shape=out))
    return rules


def _gpt2_rules() -> list[Rule]:
    h, p = "transformer.h.{L}", "gpt.decoder.layers.{L}"
    qkv = tuple(f"{p}.self_attn.{x}_proj" for x in "qkv")
    return [
        R("transformer.wte.weight", "gpt.embeddings.word_embeddings.weight", shape="V,H"),
        # paddle saves the tied head too
        R("transformer.wte.weight", "lm_head.weight", to_hf=False, shape="V,H"),
        R("transformer.wpe.weight", "gpt.embeddings.position_embeddings.weight", shape="P,H"),
        R("transformer.ln_f.weight", "gpt.decoder.norm.weight", shape="H"),
        R("transformer.ln_f.bias", "gpt.decoder.norm.bias", shape="H"),
        R(f"{h}.ln_1.weight", f"{p}.norm1.weight", shape="H"),
        R(f"{h}.ln_1.bias", f"{p}.norm1.bias", shape="H"),
        R(f"{h}.ln_2.weight", f"{p}.norm2.weight", shape="H"),
        R(f"{h}.ln_2.bias", f"{p}.norm2.bias", shape="H"),
        # Conv1D stores [in, out]: c_attn is [hidden, 3 * hidden], split into q/k/v [hidden, hidden]
        R(
            f"{h}.attn.c_attn.weight",
            tuple(f"{x}.weight" for x in qkv),
            "chunk",
            shape="H,3H",
            pd_shape="H,H",
        ),
        R(f"{h}.attn.c_attn.bias", tuple(f"{x}.bias" for x in qkv), "chunk", shape="3H", pd_shape="H"),
        R(f"{h}.attn.c_proj.weight", f"{p}.self_attn.out_proj.weight", shape="H,H"),
        R(f"{h}.attn.c_proj.bias", f"{p}.self_attn.out_proj.bias", shape="H"),
        R(f"{h}.mlp.c_fc.weight", f"{p}.linear1.weight", shape="H,I"),
        R(f"{h}.mlp.c_fc.bias", f"{p}.linear1.bias", shape="I"),
        R(f"{h}.mlp.c_proj.weight", f"{p}.linear2.weight", shape="I,H"),
        R(f"{h}.mlp.c_proj.bias", f"{p}.linear2.bias", shape="H"),
    ]


def _opt_rules() -> list[Rule]:
    h, p = "model.decoder.layers.{L}", "opt.decoder.layers.{L}"
    bias = lambda c: bool(getattr(c, "enable_bias", True))  # noqa: E731
    final = lambda c: bool(getattr(c, "normalize_before", True))  # noqa: E731
    rules = [
        R("model.decoder.embed_tokens.weight", "opt.embeddings.word_embeddings.weight", shape="V,H"),
        R(
            "model.decoder.embed_positions.weight",
            "opt.embeddings.position_embeddings.weight",
            shape="P2,H",
        ),
        R(
            "model.decoder.final_layer_norm.weight",
            "opt.decoder.final_layer_norm.weight",
            when=final,
            shape="H",
        ),
        R("model.decoder.final_layer_norm.bias", "opt.decoder.final_layer_norm.bias", when=final, shape="H"),
        R("lm_head.weight", "lm_head.decoder_weight", shape="V,H"),
    ]
    for hf_name, pd_name in (("self_attn_layer_norm", "norm1"), ("final_layer_norm", "norm2")):
        for kind in ("weight", "bias"):
            rules.append(R(f"{h}.{hf_name}.{kind}", f"{p}.{pd_name}.{kind}", shape="H"))
    linears = [
        (f"self_attn.{x}", f"self_attn.{x}", "H,H") for x in ("q_proj", "k_proj", "v_proj", "out_proj")
    ]
    for hf_name, pd_name, shape in linears + [("fc1", "linear1", "F,H"), ("fc2", "linear2", "H,F")]:
        rules.append(R(f"{h}.{hf_name}.weight", f"{p}.{pd_name}.weight", "T", shape=shape))
        rules.append(R(f"{h}.{hf_name}.bias", f"{p}.{pd_name}.bias", when=bias, shape=shape.split(",")[0]))
    return rules


SPECS: dict[str, ConvSpec] = {
    "llama": ConvSpec(
        "llama", "llama", _llama_rules("llama"), C.llama_to_paddle, C.llama_to_hf,
        embed="model.embed_tokens.weight", head="lm_head.weight", head_rule=("lm_head.weight", "T"),
        ignore_hf=[r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"],
    ),
    "qwen2": ConvSpec(
        "qwen2", "llama", _llama_rules("llama"), C.qwen2_to_paddle, C.llama_to_hf,
        embed="model.embed_tokens.weight", head="lm_head.weight", head_rule=("lm_head.weight", "T"),
    ),
    "mixtral": ConvSpec(
        "mixtral", "mixtral", _llama_rules("mixtral", mixtral=True), C.mixtral_to_paddle, C.mixtral_to_hf,
        embed="model.embed_tokens.weight", head="lm_head.weight", head_rule=("lm_head.weight", "T"),
        ignore_hf=[r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"],
    ),
    "qwen": ConvSpec(
        "qwen", "qwen", _qwen_rules(), C.qwen_to_paddle, C.qwen_to_hf,
        embed="transformer.wte.weight", head="lm_head.weight", head_rule=("lm_head.weight", "T"),
        ignore_hf=[r"transformer\.rotary_emb\.inv_freq"],
    ),
    "chatglm_v2": ConvSpec(
        "chatglm_v2", "chatglm_v2", _chatglm2_rules(), C.chatglm2_to_paddle, C.chatglm2_to_hf,
        embed="transformer.embedding.word_embeddings.weight", head="transformer.output_layer.weight",
        head_rule=("chatglm_v2.output_layer.weight", "T"),
        # paddlenlp recomputes the rotary table (base 10000) and never reads this buffer
        ignore_hf=[r"transformer\.rotary_pos_emb\.inv_freq"],
        ignore_pd=[r"chatglm_v2\.rotary_pos_emb\.inv_freq"],
    ),
    "bloom": ConvSpec(
        "bloom", "bloom", _bloom_rules(), C.bloom_to_paddle, C.bloom_to_hf,
        embed="transformer.word_embeddings.weight", head="lm_head.weight", head_rule=None,
        tie_default=True, paddle_ties=True, hf_prefix="transformer.", ignore_pd=[r"lm_head\.decoder_weight"],
    ),
    "gpt": ConvSpec(
        "gpt", "gpt", _gpt2_rules(), C.gpt2_to_paddle, C.gpt2_to_hf,
        embed="transformer.wte.weight", head="lm_head.weight", head_rule=None,
        tie_default=True, paddle_ties=True, hf_prefix="transformer.",
        ignore_hf=[r"transformer\.h\.\d+\.attn\.(bias|masked_bias)"],
    ),
    "opt": ConvSpec(
        "opt", "opt", _opt_rules(), C.opt_to_paddle, C.opt_to_hf,
        embed="model.decoder.embed_tokens.weight", head="lm_head.weight",
        head_rule=("lm_head.decoder_weight", "copy"), tie_default=True, hf_prefix="model.",
    ),
}  # fmt: skip

_HF_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "mixtral": "mixtral",
    "qwen": "qwen",
    "chatglm": "chatglm_v2",
    "bloom": "bloom",
    "gpt2": "gpt",
    "opt": "opt",
}
_ARCH_TYPES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "QWenLMHeadModel": "qwen",
    "ChatGLMModel": "chatglm_v2",
    "ChatGLMForConditionalGeneration": "chatglm_v2",
    "BloomForCausalLM": "bloom",
    "BloomModel": "bloom",
    "GPT2LMHeadModel": "gpt",
    "GPT2Model": "gpt",
    "OPTForCausalLM": "opt",
    "OPTModel": "opt",
}
SUPPORTED = "llama, qwen2 (zero q/k/v biases only), mixtral, qwen, chatglm2/3, bloom, gpt2, opt"


def spec_for_hf(hf: dict[str, Any]) -> ConvSpec:
    """The spec for an HF ``config.json``; unsupported architectures raise :class:`ModelError`."""
    model_type = str(hf.get("model_type") or "").lower()
    archs = hf.get("architectures") or []
    name = _HF_TYPES.get(model_type) or next((_ARCH_TYPES[a] for a in archs if a in _ARCH_TYPES), None)
    if name == "chatglm_v2" and C.is_chatglm_v1(hf):
        raise ModelError(
            "cannot convert ChatGLM-6B (v1) checkpoints: its HF layout is not mapped by this toolkit "
            "(paddlenlp 2.8 marks ChatGLM-6B conversion unsupported too); ChatGLM2/3 are supported"
        )
    if name is None:
        what = model_type or (archs[0] if archs else "unknown")
        raise ModelError(
            f"cannot convert model_type '{what}': supported Hugging Face architectures are {SUPPORTED}"
        )
    return SPECS[name]


def spec_for_paddle(family: str) -> ConvSpec:
    """The spec exporting a toolkit family (``llama``, ``qwen``, ...) to Hugging Face."""
    for spec in SPECS.values():
        if spec.family == family and spec.name != "qwen2":
            return spec
    raise ModelError(
        f"cannot export model family '{family}' to Hugging Face: supported families are "
        + ", ".join(s.family for s in SPECS.values() if s.name != "qwen2")
    )


def hf_ties(spec: ConvSpec, hf: dict[str, Any]) -> bool:
    """Whether the HF model ties lm_head to the input embedding (chatglm2 never does)."""
    if spec.name == "chatglm_v2":
        return False
    return bool(hf.get("tie_word_embeddings", spec.tie_default))
