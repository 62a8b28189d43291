"""Per-family facts for the causal-LM families paddlenlp 2.8.1 ships.

Everything a caller needs to treat the nine families alike lives here: model/config classes, the
PaddleNLP ``llm/utils.py`` LoRA target regexes, prefix-tuning geometry and ``past_key_values``
post-processing, the input convention (``standard`` or ChatGLM/GLM 2-D position ids), and a support
matrix that was *measured* on CPU (see ``tests/test_model_families.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paddle
from paddlenlp.peft import LoRAModel, PrefixModelForCausalLM
from paddlenlp.peft.prefix import (
    bloom_postprocess_past_key_value,
    chatglm_postprocess_past_key_value,
    llama_postprocess_past_key_value,
    qwen_postprocess_past_key_value,
)
from paddlenlp.transformers import (
    BloomConfig,
    BloomForCausalLM,
    ChatGLMConfig,
    ChatGLMForCausalLM,
    ChatGLMv2Config,
    ChatGLMv2ForCausalLM,
    GLMConfig,
    GLMForConditionalGeneration,
    GPTConfig,
    GPTForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PretrainedConfig,
    QWenConfig,
    QWenForCausalLM,
)
from paddlenlp.transformers.opt.modeling import MultiHeadAttention as _OPTAttention

from llm.errors import ConfigError

MODES = ("sft", "lora", "prefix", "zero_padding")


# --------------------------------------------------------------------------------------------------
# prefix-tuning helpers
# --------------------------------------------------------------------------------------------------
def opt_postprocess_past_key_value(past_key_values: paddle.Tensor) -> list[Any]:
    """Shape a prefix ``[b, p, 2L, h, d]`` into OPT's per-layer ``Cache(k, v)`` of ``[b, h, p, d]``.

    paddlenlp ships no OPT function, and OPT's attention reads ``cache.k``/``cache.v``
    (``'tuple' object has no attribute 'k'`` with the llama function).
    """
    keys, values = paddle.transpose(past_key_values, perm=[2, 0, 3, 1, 4]).split(2)
    return [_OPTAttention.Cache(k, v) for k, v in zip(keys, values)]


def gpt_postprocess_past_key_value(past_key_values: paddle.Tensor) -> tuple[Any, ...]:
    """GPT caches ``(k, v)`` as ``[b, s, h, d]`` per layer, the same layout as llama."""
    return llama_postprocess_past_key_value(past_key_values)


def _heads_layers_hidden(config: PretrainedConfig) -> tuple[int, int, int]:
    heads = getattr(config, "n_head", None) or config.num_attention_heads
    layers = (
        getattr(config, "n_layer", None) or getattr(config, "num_layers", None) or config.num_hidden_layers
    )
    return int(heads), int(layers), int(config.hidden_size)


def _gqa_groups(config: PretrainedConfig, attr: str) -> int | None:
    groups = getattr(config, attr, None)
    heads = _heads_layers_hidden(config)[0]
    return int(groups) if groups and int(groups) != heads else None


def prefix_geometry(family: str, config: PretrainedConfig) -> dict[str, int | None]:
    """``num_attention_heads``/``num_hidden_layers``/``hidden_size``/``multi_query_group_num`` for PrefixConfig.

    Mirrors PaddleNLP's ``get_prefix_tuning_params`` but also passes the KV-group count for GQA llama
    and mixtral (PaddleNLP passes None for llama, which breaks GQA checkpoints).
    """
    heads, layers, hidden = _heads_layers_hidden(config)
    groups: int | None = None
    if family in ("llama", "mixtral"):
        groups = _gqa_groups(config, "num_key_value_heads")
    elif family == "chatglm_v2":
        groups = (
            int(config.multi_query_group_num) if getattr(config, "multi_query_attention", False) else None
        )
    return {
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "multi_query_group_num": groups,
    }


# --------------------------------------------------------------------------------------------------
# the family table
# --------------------------------------------------------------------------------------------------
@dataclass
class FamilySpec:
    """What the toolkit knows about one model family.

    ``supports``: measured on CPU for ``sft``, ``lora``, ``prefix`` and ``zero_padding`` (4-D block mask +
    ``position_ids``); ``reason`` explains every False. ``input_style`` is ``standard`` (2-D padding mask
    accepted), ``chatglm`` or ``glm`` (native 4-D mask and ``[b, 2, s]`` position ids; the toolkit's
    forward adapter converts plain causal batches, see :func:`llm.model.loading.apply_family_fixes`).
    ``paddlenlp_zero_padding`` records whether PaddleNLP 2.8 itself allows zero padding for the family.
    ``prefix_shifts_positions``: the model numbers positions after its cache, so a prefix shifts them.
    """

    name: str
    model_class: type
    config_class: type
    lora_target_modules: list[str]
    supports: dict[str, bool]
    reason: dict[str, str] = field(default_factory=dict)
    prefix_postprocess: Callable[[paddle.Tensor], Any] | None = None
    input_style: str = "standard"
    paddlenlp_zero_padding: bool = False
    prefix_shifts_positions: bool = False
    architectures: tuple[str, ...] = ()
    tiny: dict[str, Any] = field(default_factory=dict)

    def check(self, mode: str) -> None:
        """Raise :class:`ConfigError` when ``mode`` is not supported for this family."""
        if mode not in MODES:
            raise ConfigError(f"unknown training mode {mode!r}; expected one of {', '.join(MODES)}")
        if not self.supports.get(mode, False):
            why = self.reason.get(mode, "not supported")
            raise ConfigError(f"{mode} is not supported for model family '{self.name}': {why}")


_LLAMA_LORA = [
    ".*q_proj.*",
    ".*v_proj.*",
    ".*k_proj.*",
    ".*o_proj.*",
    ".*qkv_proj.*",
    ".*gate_proj.*",
    ".*down_proj.*",
    ".*up_proj.*",
    ".*gate_up_fused_proj.*",
]
_GLM_LORA = [".*query_key_value.*", ".*dense.*", ".*dense_h_to_4h.*", ".*dense_4h_to_h.*"]

_ALL = {"sft": True, "lora": True, "prefix": True, "zero_padding": True}

FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec(
        name="llama",
        model_class=LlamaForCausalLM,
        config_class=LlamaConfig,
        lora_target_modules=_LLAMA_LORA,
        supports=dict(_ALL),
        prefix_postprocess=llama_postprocess_past_key_value,
        paddlenlp_zero_padding=True,
        architectures=("LlamaForCausalLM",),
        tiny=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            seq_length=256,
        ),
    ),
    "qwen": FamilySpec(
        name="qwen",
        model_class=QWenForCausalLM,
        config_class=QWenConfig,
        lora_target_modules=[
            ".*attn.c_attn.*",
            ".*attn.c_proj.*",
            ".*mlp.w1.*",
            ".*mlp.w2.*",
            ".*mlp.c_proj.*",
        ],
        supports=dict(_ALL),
        prefix_postprocess=qwen_postprocess_past_key_value,
        paddlenlp_zero_padding=True,
        architectures=("QWenForCausalLM", "QWenLMHeadModel"),
        tiny=dict(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            kv_channels=8,
            max_position_embeddings=256,
            seq_length=256,
        ),
    ),
    "chatglm": FamilySpec(
        name="chatglm",
        model_class=ChatGLMForCausalLM,
        config_class=ChatGLMConfig,
        lora_target_modules=list(_GLM_LORA),
        supports=dict(_ALL),
        prefix_postprocess=chatglm_postprocess_past_key_value,
        input_style="chatglm",
        paddlenlp_zero_padding=True,
        architectures=("ChatGLMForCausalLM", "ChatGLMForConditionalGeneration", "ChatGLMModel"),
        tiny=dict(
            hidden_size=32,
            inner_hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_sequence_length=256,
            mask_token_id=3,
            gmask_token_id=4,
        ),
    ),
    "chatglm_v2": FamilySpec(
        name="chatglm_v2",
        model_class=ChatGLMv2ForCausalLM,
        config_class=ChatGLMv2Config,
        lora_target_modules=[
            ".*query.*",
            ".*key.*",
            ".*value.*",
            ".*dense.*",
            ".*dense_h_to_4h.*",
            ".*dense_4h_to_h.*",
        ],
        supports=dict(_ALL),
        prefix_postprocess=chatglm_postprocess_past_key_value,
        paddlenlp_zero_padding=True,
        architectures=("ChatGLMv2ForCausalLM", "ChatGLMForConditionalGeneration", "ChatGLMModel"),
        tiny=dict(
            hidden_size=32,
            ffn_hidden_size=64,
            kv_channels=8,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query_attention=True,
            multi_query_group_num=2,
            add_qkv_bias=True,
            max_sequence_length=256,
        ),
    ),
    "bloom": FamilySpec(
        name="bloom",
        model_class=BloomForCausalLM,
        config_class=BloomConfig,
        lora_target_modules=list(_GLM_LORA),
        supports=dict(_ALL),
        prefix_postprocess=bloom_postprocess_past_key_value,
        paddlenlp_zero_padding=True,
        architectures=("BloomForCausalLM",),
        tiny=dict(hidden_size=32, n_layer=2, n_head=4),
    ),
    "gpt": FamilySpec(
        name="gpt",
        model_class=GPTForCausalLM,
        config_class=GPTConfig,
        lora_target_modules=[
            ".*qkv_proj.*",
            ".*q_proj.*",
            ".*k_proj.*",
            ".*v_proj.*",
            ".*linear1.*",
            ".*linear2.*",
            ".*out_proj.*",
        ],
        supports=dict(_ALL),
        prefix_postprocess=gpt_postprocess_past_key_value,
        prefix_shifts_positions=True,
        architectures=("GPTForCausalLM", "GPTLMHeadModel", "GPTForPretraining"),
        tiny=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            seq_length=256,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            ignore_index=-100,
        ),
    ),
    "opt": FamilySpec(
        name="opt",
        model_class=OPTForCausalLM,
        config_class=OPTConfig,
        lora_target_modules=[
            ".*project_in.*",
            ".*project_out.*",
            ".*q_proj.*",
            ".*k_proj.*",
            ".*v_proj.*",
            ".*qkv_proj.*",
            ".*out_proj.*",
            ".*linear1.*",
            ".*linear2.*",
        ],
        supports={"sft": True, "lora": True, "prefix": True, "zero_padding": False},
        reason={
            "zero_padding": "OPT derives positions from a 2-D attention mask and cannot take a 4-D block "
            "mask with position_ids (its mask expansion fails); PaddleNLP 2.8 also refuses zero padding for opt",
        },
        prefix_postprocess=opt_postprocess_past_key_value,
        architectures=("OPTForCausalLM",),
        tiny=dict(
            hidden_size=32,
            word_embed_proj_dim=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
    ),
    "mixtral": FamilySpec(
        name="mixtral",
        model_class=MixtralForCausalLM,
        config_class=MixtralConfig,
        lora_target_modules=[
            ".*q_proj.*",
            ".*k_proj.*",
            ".*v_proj.*",
            ".*o_proj.*",
            ".*w1.*",
            ".*w2.*",
            ".*w3.*",
        ],
        supports=dict(_ALL),
        prefix_postprocess=llama_postprocess_past_key_value,
        architectures=("MixtralForCausalLM",),
        tiny=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=256,
            seq_length=256,
        ),
    ),
    "glm": FamilySpec(
        name="glm",
        model_class=GLMForConditionalGeneration,
        config_class=GLMConfig,
        lora_target_modules=list(_GLM_LORA),
        supports={"sft": True, "lora": True, "prefix": False, "zero_padding": True},
        reason={
            "prefix": "GLM's cache holds per-layer hidden-state memories, not key/value pairs, so "
            "PrefixModelForCausalLM's past_key_values cannot be injected (PaddleNLP 2.8 has no glm prefix support)",
        },
        input_style="glm",
        architectures=("GLMForConditionalGeneration", "GLMModel"),
        tiny=dict(
            hidden_size=32,
            num_layers=2,
            num_attention_heads=4,
            max_sequence_length=256,
            embedding_dropout_prob=0.0,
            attention_dropout_prob=0.0,
            output_dropout_prob=0.0,
            output_predict=True,
        ),
    ),
}

_ARCH_TO_FAMILY = {arch: spec.name for spec in FAMILIES.values() for arch in spec.architectures}
_ALIASES = {"chatglm2": "chatglm_v2", "chatglmv2": "chatglm_v2", "gpt2": "gpt", "gpt-3": "gpt", "gpt3": "gpt"}


def _supported_list() -> str:
    return ", ".join(FAMILIES)


def get_family(name: str) -> FamilySpec:
    """Look a family up by name (``llama``, ``chatglm_v2``, ...); unknown names raise :class:`ConfigError`."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in FAMILIES:
        hint = " (qwen2 needs paddlenlp >= 2.9)" if key.startswith("qwen2") else ""
        raise ConfigError(f"unsupported model family '{name}'{hint}; supported families: {_supported_list()}")
    return FAMILIES[key]


def unwrap_model(obj: Any) -> Any:
    """Strip ``DataParallel`` / fleet's ``ShardingParallel`` (any wrapper holding ``_layers``) / ``LoRAModel`` /
    ``PrefixModelForCausalLM`` wrappers; return the inner model."""
    while True:
        if isinstance(obj, paddle.nn.Layer) and isinstance(getattr(obj, "_layers", None), paddle.nn.Layer):
            obj = obj._layers
        elif isinstance(obj, LoRAModel | PrefixModelForCausalLM):
            obj = obj.model
        else:
            return obj


def family_of(model_or_config: Any) -> FamilySpec:
    """Return the :class:`FamilySpec` of a model (plain, LoRA or prefix wrapped), a config, or a config dict.

    Uses ``model_type``, then ``base_model_prefix``, then ``architectures``. Unknown models raise
    :class:`ConfigError` listing the supported families.
    """
    obj = unwrap_model(model_or_config)
    if isinstance(obj, dict):
        model_type, prefix, archs = obj.get("model_type"), None, obj.get("architectures") or []
    else:
        config = obj if isinstance(obj, PretrainedConfig) else getattr(obj, "config", None)
        model_type = getattr(config, "model_type", None) or getattr(type(config), "model_type", None)
        prefix = getattr(obj, "base_model_prefix", None)
        archs = list(getattr(config, "architectures", None) or [])
        if isinstance(obj, paddle.nn.Layer):
            archs.insert(0, type(obj).__name__)
    for key in (model_type, prefix):
        if key:
            key = _ALIASES.get(str(key).lower(), str(key).lower())
            if key in FAMILIES:
                return FAMILIES[key]
    for arch in archs:
        if arch in _ARCH_TO_FAMILY:
            return FAMILIES[_ARCH_TO_FAMILY[arch]]
    what = model_type or prefix or (archs[0] if archs else type(obj).__name__)
    hint = " (qwen2 needs paddlenlp >= 2.9)" if str(what).lower().startswith("qwen2") else ""
    raise ConfigError(f"unsupported model family '{what}'{hint}; supported families: {_supported_list()}")


def tiny_config(family: str, vocab_size: int = 256, **overrides: Any) -> PretrainedConfig:
    """A ~2-layer, hidden-32 random-init config for ``family`` (GQA for llama/mixtral/chatglm_v2).

    ``max_position_embeddings``/sequence limits are 256; ids default to pad 0, bos 1, eos 2 and can be
    overridden (any config field can).
    """
    spec = get_family(family)
    kwargs: dict[str, Any] = dict(spec.tiny)
    kwargs.update(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    config = spec.config_class(**kwargs)
    config.architectures = [spec.model_class.__name__]
    return config
