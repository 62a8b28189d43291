"""Chat templates: both kinds, the training == inference invariant, and template selection."""

from __future__ import annotations

import json
import pickle

import jinja2
import pytest

import llm  # noqa: F401
from llm.errors import ConfigError
from llm.templates import ChatTemplate, resolve_chat_template
from llm.tokenizer import load_tokenizer

try:
    import helpers_tokenizer as h
except ImportError:  # tests/ imported as a package
    from tests import helpers_tokenizer as h

# paddlenlp template that uses the round variables, to prove they agree between both paths
PADDLENLP_ROUND_VARS = {
    "system": "{% if system %}[SYS {{system}}]{% endif %}",
    "conversation": [
        "{% if is_first %}<s>{% endif %}[R{{index}}/{{length}}{% if is_last %} last{% endif %}] U: {{user}}\nA: ",
        "{{bot}}{{eos_token}}",
    ],
}
TEMPLATES = {
    "chatml": lambda: ChatTemplate.from_jinja(h.CHATML_TEMPLATE),
    "llama2": lambda: ChatTemplate.from_jinja(h.LLAMA2_TEMPLATE),
    "paddlenlp": lambda: ChatTemplate.from_paddlenlp(h.PADDLENLP_TEMPLATE),
    "paddlenlp-vars": lambda: ChatTemplate.from_paddlenlp(PADDLENLP_ROUND_VARS),
    "paddlenlp-query-only": lambda: ChatTemplate.from_paddlenlp({"query": "Q: {{query}}\nA: "}),
}
CONVERSATIONS = [
    ([("hello", "hi there!")], None),
    ([("What is the capital of France?", "Paris.")], {"system": "You answer briefly."}),
    ([("你好", "你好！"), ("今天天气怎么样？", "很好。"), ("thanks", "you're welcome")], None),
    ([("a", "b"), ("  spaced  ", "\nnewline\n"), ("", "empty user")], {"system": "custom system"}),
    ([("1+1?", "2"), ("2+2?", "4")], {"system": "", "extra": "ignored"}),
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    # no generation_config: <|im_end|> is not a stop id, so EOS gets appended to ChatML answers
    return load_tokenizer(h.make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_training_equals_inference(tok, name, conv):
    tmpl = TEMPLATES[name]()
    rounds, context = CONVERSATIONS[conv]
    system, pairs = tmpl.encode_training(tok, rounds, context)
    assert len(pairs) == len(rounds)
    train_prompt = list(system)
    for user, bot in pairs[:-1]:
        train_prompt += user + bot
    train_prompt += pairs[-1][0]
    assert train_prompt == tmpl.encode_prompt(tok, rounds[:-1], rounds[-1][0], context)
    for _, bot in pairs:  # every answer ends with something that stops generation
        assert bot and bot[-1] in tok.eos_token_ids


def test_segments_concatenate_to_full_render(tok):
    tmpl = ChatTemplate.from_jinja(h.CHATML_TEMPLATE)
    rounds = [("hi", "hello"), ("how are you?", "fine")]
    system, segs, final = tmpl.render_segments(
        rounds[:1], "how are you?", {"system": "S"}, tok.special_token_vars()
    )
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    msgs += [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you?"}]
    full = env.from_string(h.CHATML_TEMPLATE).render(
        messages=msgs, add_generation_prompt=True, bos_token="<s>"
    )
    assert system + "".join(u + b for u, b in segs) + final == full
    assert system == "<s><|im_start|>system\nS<|im_end|>\n"
    assert segs[0] == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "hello<|im_end|>\n")
    assert tmpl.render_prompt(rounds[:1], "how are you?", {"system": "S"}, tokenizer=tok) == full


def test_eos_appended_only_when_missing(tok, tmp_path):
    chatml = ChatTemplate.from_jinja(h.CHATML_TEMPLATE)
    _, pairs = chatml.encode_training(tok, [("q", "a")])
    assert pairs[0][1][-1] == tok.eos_token_id  # "a<|im_end|>\n" + </s>
    assert pairs[0][1][:-1] == tok.encode("a<|im_end|>\n", add_special_tokens=False)
    _, pairs = ChatTemplate.from_jinja(h.LLAMA2_TEMPLATE).encode_training(tok, [("q", "a")])
    assert pairs[0][1] == tok.encode(" a </s>", add_special_tokens=False)  # already ends with EOS
    # with <|im_end|> as an extra stop id (generation_config.json) nothing is appended
    stop_tok = load_tokenizer(
        h.make_tokenizer_dir(tmp_path / "g", generation_config={"eos_token_id": [2, 5]})
    )
    _, pairs = chatml.encode_training(stop_tok, [("q", "a")])
    assert pairs[0][1] == stop_tok.encode("a<|im_end|>\n", add_special_tokens=False)


def test_paddlenlp_rendering(tok):
    tmpl = ChatTemplate.from_paddlenlp(h.PADDLENLP_TEMPLATE)
    system, segs, final = tmpl.render_segments([("hi", "yo")], "next", {"system": "Be terse."})
    assert system == "<|im_start|>system\nBe terse.<|im_end|>"
    assert segs == [("\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "yo<|im_end|>")]
    assert final == "\n<|im_start|>user\nnext<|im_end|>\n<|im_start|>assistant\n"
    assert tmpl.render_segments([], "q")[0] == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>"
    vars_tmpl = ChatTemplate.from_paddlenlp(PADDLENLP_ROUND_VARS)
    text = vars_tmpl.render_prompt([("a", "b")], "c", tokenizer=tok)
    assert text == "<s>[R0/2] U: a\nA: b</s>[R1/2 last] U: c\nA: "


def test_special_tokens_are_single_ids(tok):
    ids = ChatTemplate.from_jinja(h.CHATML_TEMPLATE).encode_prompt(tok, [], "hi")
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|im_start|>")]
    assert ids.count(tok.bos_token_id) == 1  # add_special_tokens=False: BOS comes only from the template


def test_template_errors(tok):
    bad = ChatTemplate.from_jinja(
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ConfigError, match="cannot be split into segments"):
        bad.encode_training(tok, [("a", "b")])
    with pytest.raises(ConfigError, match="syntax error"):
        ChatTemplate.from_jinja("{% for m in messages %}")
    raising = ChatTemplate.from_jinja("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ConfigError, match="roles must alternate"):
        raising.encode_prompt(tok, [], "x")
    with pytest.raises(ConfigError, match="exactly two strings"):
        ChatTemplate.from_paddlenlp({"conversation": ["only one"]})
    with pytest.raises(ConfigError, match="non-empty string"):
        ChatTemplate.from_jinja("")


def test_named_template_list_and_pickle(tok):
    tmpl = ChatTemplate.from_jinja(
        [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 1 }}"}]
    )
    assert tmpl.source == "{{ 1 }}"
    chatml = ChatTemplate.from_jinja(h.CHATML_TEMPLATE)
    copy = pickle.loads(pickle.dumps(chatml))
    assert copy.encode_prompt(tok, [("a", "b")], "c") == chatml.encode_prompt(tok, [("a", "b")], "c")


def test_resolve_chat_template(tmp_path):
    model_dir = h.make_tokenizer_dir(tmp_path / "model")
    tok = load_tokenizer(model_dir)
    original = tok.chat_template
    assert resolve_chat_template(tok, model_dir, None) is original
    assert resolve_chat_template(tok, model_dir, "none") is None and tok.chat_template is None
    assert resolve_chat_template(tok, model_dir, model_dir).source == h.CHATML_TEMPLATE
    assert tok.chat_template.special_tokens["bos_token"] == "<s>"
    # a directory with chat_template.json (paddlenlp) wins over tokenizer_config.json
    pd_dir = h.make_tokenizer_dir(tmp_path / "pd", paddlenlp_template=h.PADDLENLP_TEMPLATE)
    assert resolve_chat_template(tok, model_dir, pd_dir).kind == "paddlenlp"
    no_tmpl = h.make_tokenizer_dir(tmp_path / "plain", chat_template=None)
    with pytest.raises(ConfigError, match="no chat template in this directory"):
        resolve_chat_template(tok, model_dir, no_tmpl)
    assert resolve_chat_template(load_tokenizer(no_tmpl), no_tmpl, no_tmpl) is None  # model's own: none
    # files
    (tmp_path / "pd.json").write_text(json.dumps(h.PADDLENLP_TEMPLATE))
    assert resolve_chat_template(tok, model_dir, str(tmp_path / "pd.json")).kind == "paddlenlp"
    (tmp_path / "hf.json").write_text(json.dumps({"chat_template": h.LLAMA2_TEMPLATE}))
    assert resolve_chat_template(tok, model_dir, str(tmp_path / "hf.json")).source == h.LLAMA2_TEMPLATE
    (tmp_path / "t.jinja").write_text(h.LLAMA2_TEMPLATE)
    assert resolve_chat_template(tok, model_dir, str(tmp_path / "t.jinja")).kind == "jinja"
    assert resolve_chat_template(tok, model_dir, "{{ messages[0]['content'] }}").kind == "jinja"
    with pytest.raises(ConfigError, match="no such file or directory"):
        resolve_chat_template(tok, model_dir, str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="invalid JSON"):
        resolve_chat_template(tok, model_dir, str(tmp_path / "broken.json"))
