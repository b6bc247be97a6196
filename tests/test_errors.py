"""Bad input gets a clear error that names the bad value, what was expected and where it came from."""

from __future__ import annotations

import pytest
import torch

import sparseattn as sa
from sparseattn.plans import Plan, PlanError, PlanSpecError

from conftest import tiny_bert, tiny_llama


def caret_target(err: Exception) -> str:
    """The text the caret line of a spec error points at."""
    line, caret = str(err).splitlines()[-2:]
    start = caret.index("^")
    return line[start:start + caret.count("^")]


# -- specs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,message,target", [
    ("layers=3-5: neigbour(2)", "unknown pattern 'neigbour'; did you mean 'neighbour'?", "neigbour"),
    ("all: neighbour(2) | windowed(3)", "unknown pattern 'windowed'", "windowed"),
    ("all: neighbour(-1)", "neighbour degree k must be >= 0, got -1", "neighbour(-1)"),
    ("all: random(-4)", "random degree r must be >= 0, got -4", "random(-4)"),
    ("all: strided(0)", "stride s must be >= 1, got 0", "strided(0)"),
    ("all: bigbird(1, -2, 3)", "bigbird neighbour must be >= 0, got -2", "bigbird(1, -2, 3)"),
    ("all: neighbour(2.5)", "neighbour degree k must be an integer, got 2.5", "neighbour(2.5)"),
    ("all: neighbour('2')", "neighbour degree k must be an integer, got '2'", "neighbour('2')"),
    ("all: global_tokens('cls')", "number of global tokens g must be an integer, got 'cls'", "global_tokens('cls')"),
    ("all: neighbour(k=2, j=1)", "unexpected keyword argument 'j'", "neighbour(k=2, j=1)"),
    ("all: lexical(by='stem')", "lexical(by=...) must be one of ('any', 'lemma', 'lower'), got 'stem'",
     "lexical(by='stem')"),
    ("all: neighbour(2", "cannot parse pattern 'neighbour(2'", None),
    ("all: neighbour(x)", "pattern arguments must be numbers or quoted strings", "x"),
    ("middle: neighbour(2)", "unknown selector 'middle'", "middle"),
    ("layers=5-3: neighbour(2)", "bad layers range '5-3': the end is before the start", "5-3"),
    ("layers=1..3: neighbour(2)", "bad layers '1..3': expected 'all' or ranges like 0,2,4-7", "1..3"),
    ("heads=a@layers=1: neighbour(2)", "bad heads 'a'", "a"),
    ("layers=1: neighbour(2): random(3)", "a rule has one ':'", None),
    ("layers=1@layers=2: neighbour(2)", "layers given twice", "layers=2"),
    ("layers=1:", "missing pattern", None),
    ("all: static_mask('ap_l3')", "static_mask('ap_l3') names a table that is not loaded", "static_mask('ap_l3')"),
])
def test_bad_specs_point_at_the_offending_part(text, message, target):
    with pytest.raises(PlanSpecError) as e:
        Plan.parse(text)
    assert message in str(e.value)
    assert str(e.value).splitlines()[-2].strip() == text.strip()  # the spec is quoted ...
    if target is not None:
        assert caret_target(e.value) == target  # ... with a caret under the bad part


def test_caret_on_the_right_line_of_a_multi_line_spec():
    text = "layers=0: neighbour(1)\n# a comment\nlayers=1: random(2) | neighbor(1)\n"
    with pytest.raises(PlanSpecError) as e:
        Plan.parse(text)
    assert str(e.value).splitlines()[-2].strip() == "layers=1: random(2) | neighbor(1)"
    assert caret_target(e.value) == "neighbor"


@pytest.mark.parametrize("factory,args,exc,message", [
    (sa.neighbour, (-1,), ValueError, "neighbour degree k must be >= 0, got -1"),
    (sa.random, (-3,), ValueError, "random degree r must be >= 0, got -3"),
    (sa.random, (2, -1), ValueError, "random seed must be >= 0, got -1"),
    (sa.global_tokens, (-1,), ValueError, "number of global tokens g must be >= 0, got -1"),
    (sa.strided, (0,), ValueError, "stride s must be >= 1, got 0"),
    (sa.syntax, (-1,), ValueError, "syntax hops must be >= 0, got -1"),
    (sa.similar, (-2,), ValueError, "similar top_k must be >= 0, got -2"),
    (sa.bigbird, (-1, 2, 3), ValueError, "bigbird global_tokens must be >= 0, got -1"),
    (sa.neighbour, (True,), TypeError, "neighbour degree k must be an integer, got True"),
    (sa.syntax, (1, "all"), ValueError, "special must be 'self' or 'global', got 'all'"),
])
def test_bad_pattern_arguments(factory, args, exc, message):
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        factory(*args)


def test_bad_static_tables():
    with pytest.raises(ValueError, match=r"square over positions, got \(5, 6\)"):
        sa.static_mask(torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(N, N\) or \(heads, N, N\) tensor"):
        sa.static_mask(torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="key must be a non-empty name.*got 'a b'"):
        sa.static_mask(torch.ones(3, 3, dtype=torch.bool), key="a b")
    a = sa.static_mask(torch.eye(3, dtype=torch.bool), key="k")
    b = sa.static_mask(torch.ones(3, 3, dtype=torch.bool), key="k")
    with pytest.raises(ValueError, match="two different stored masks share the key 'k'"):
        a | b


# -- plans against a model ----------------------------------------------------------------------------
def test_layers_out_of_range():
    model = tiny_bert()  # 2 layers
    with pytest.raises(PlanError, match=r"in rule 'layers=1-5: neighbour\(1\)': layer 2 is out of range for a model "
                                        r"with 2 layers \(0-1\)"):
        sa.sparsify(model, "layers=1-5: neighbour(1)")
    assert sa.plan_of(model) is None and model.config._attn_implementation != "sparseattn"  # untouched


def test_heads_out_of_range():
    model = tiny_llama()  # 4 query heads
    with pytest.raises(PlanError, match=r"in rule 'heads=2-4@layers=0: random\(2\)': head 4 is out of range for a "
                                        r"model with 4 heads \(0-3\)"):
        sa.sparsify(model, "heads=2-4@layers=0: random(2)")


def test_bad_plan_arguments():
    model = tiny_bert()
    with pytest.raises(TypeError, match="plan must be a Plan, a spec string or a saved plan's path, got int"):
        sa.sparsify(model, 3)
    with pytest.raises(ValueError, match="unknown backend 'flash'; available: .*reference"):
        sa.sparsify(model, "all: neighbour(1)", backend="flash")


# -- models that cannot be sparsified ---------------------------------------------------------------
def test_a_plain_torch_module_is_refused():
    with pytest.raises(sa.UnsupportedModelError, match="needs a transformers PreTrainedModel, got Linear"):
        sa.sparsify(torch.nn.Linear(4, 4), "all: neighbour(1)")


def test_a_model_without_attention_interface_support_is_refused():
    # MPNet (all-mpnet-base-v2's architecture) does not route attention through transformers' interface
    from transformers import MPNetConfig, MPNetModel

    model = MPNetModel(MPNetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                   vocab_size=100))
    assert model._supports_attention_backend is False
    with pytest.raises(sa.UnsupportedModelError, match=r"MPNetModel does not support transformers' AttentionInterface "
                                                       r"\(its _supports_attention_backend is False\)"):
        sa.sparsify(model, "all: neighbour(1)")


def test_a_subclass_that_opts_out_is_refused():
    from transformers import BertModel

    class LegacyBert(BertModel):
        _supports_attention_backend = False

    model = LegacyBert(tiny_bert().config)
    with pytest.raises(sa.UnsupportedModelError, match="LegacyBert does not support"):
        sa.sparsify(model, "all: neighbour(1)")


# -- empty and over-long input -----------------------------------------------------------------------
def test_empty_input(tokenizer):
    with pytest.raises(ValueError, match="encode\\(\\) got no texts"):
        sa.encode(tokenizer, [])
    with pytest.raises(ValueError, match="text 1 is empty \\('  '\\)"):
        sa.encode(tokenizer, ["Fine.", "  "])
    with pytest.raises(ValueError, match="got lengths \\[3, 0\\]"):
        sa.TokenLayout.from_lengths([3, 0])
    model = tiny_bert()
    sa.sparsify(model, "all: neighbour(1)")
    with pytest.raises(ValueError, match="the input has no tokens"):
        model(input_ids=torch.zeros(2, 0, dtype=torch.long))


def test_over_long_input_to_a_model():
    model = tiny_bert()  # max_position_embeddings=40
    sa.sparsify(model, "all: neighbour(1)")
    model(input_ids=torch.randint(5, 100, (1, 40)))
    with pytest.raises(ValueError, match=r"the input has 41 tokens but BertModel supports at most 40 "
                                         r"\(max_position_embeddings"):
        model(input_ids=torch.randint(5, 100, (1, 41)))
    llama = tiny_llama()  # max_position_embeddings=40: RoPE would extrapolate silently
    sa.sparsify(llama, "all: neighbour(1)")
    with pytest.raises(ValueError, match="the input has 45 tokens but LlamaForCausalLM supports at most 40"):
        llama(input_ids=torch.randint(5, 100, (1, 45)))


def test_over_long_input_to_encode(tokenizer):
    text = "word " * 30  # 32 tokens with [CLS] and [SEP]
    with pytest.raises(ValueError, match=r"example 1 is 32 tokens long, more than max_length=16; .*truncation=True"):
        sa.encode(tokenizer, ["Short.", text], max_length=16)
    enc = sa.encode(tokenizer, ["Short.", text], max_length=16, truncation=True)  # explicit truncation is fine
    assert enc["input_ids"].shape == (2, 16) and enc["sparse_structure"].word_ids.shape == (2, 16)
    with pytest.raises(ValueError, match=r"example 0 is \d+ tokens long, more than max_length=512"):
        sa.encode(tokenizer, ["word " * 600])  # the tokenizer's own limit applies by default


def test_input_dependent_pattern_without_structure(tokenizer):
    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    sa.sparsify(model, "all: global_tokens('special')")
    ids = tokenizer(["Dogs bark."], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match=r"global_tokens\('special'\) needs to know the special tokens: pass a "
                                         r"tokenizer to sparseattn.sparsify"):
        model(input_ids=ids)
    sa.sparsify(model, "all: global_tokens('special')", tokenizer=tokenizer)
    model(input_ids=ids)  # with the tokenizer, [CLS] and [SEP] are found from the ids


def test_roberta_positions_offset_counts_against_the_length_limit():
    """RoBERTa numbers positions from padding_idx + 1: 20 position embeddings take 18 tokens."""
    from transformers import RobertaConfig, RobertaModel

    m = RobertaModel(RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=20, pad_token_id=1)).eval()
    sa.sparsify(m, "all: neighbour(1)")
    m(input_ids=torch.full((1, 18), 5))
    with pytest.raises(ValueError, match=r"19 tokens .* at most 18 \(max_position_embeddings, less any position offset\)"):
        m(input_ids=torch.full((1, 19), 5))


def test_default_model_can_be_pointed_elsewhere(monkeypatch, tmp_path):
    """On a machine without the packaged model, SPARSEATTN_DEFAULT_MODEL names a copy of it."""
    from sparseattn.models import DEFAULT_HUB_ID, resolve_model

    monkeypatch.setenv("SPARSEATTN_DEFAULT_MODEL", str(tmp_path))
    assert resolve_model(None) == str(tmp_path)
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"
    monkeypatch.delenv("SPARSEATTN_DEFAULT_MODEL")
    assert resolve_model(None) != str(tmp_path) and resolve_model(None) in (DEFAULT_HUB_ID, resolve_model("default"))
