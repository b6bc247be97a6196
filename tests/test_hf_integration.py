"""Sparse attention inside Hugging Face models, checked against attention written out by hand.

The reference here recomputes each layer's attention from the module's own weights (captured inputs,
q/k/v projections, RoPE for Llama, grouped-query heads repeated) with softmax(QK^T / sqrt(d)) and -inf
on removed pairs, using keep-masks built by loops in conftest.hand_mask."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sparseattn as sa

from conftest import eager_masked_attention, hand_mask, make_layout, tiny_bert, tiny_llama

SENTENCES = ["A man is playing a guitar.", "Dogs bark.", "The cat sat quietly on the warm windowsill."]
ATOL = 2e-5


# -- helpers ----------------------------------------------------------------------------------------
def capture_attention(modules):
    """Record each attention module's call (args, kwargs) and output; returns (records, remove)."""
    records: dict[int, dict] = {}
    handles = []
    for m in modules:
        def pre(mod, args, kwargs):
            records.setdefault(mod.layer_idx, {}).update(args=args, kwargs=kwargs)

        def post(mod, args, kwargs, output):
            records[mod.layer_idx]["output"] = output

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    return records, lambda: [h.remove() for h in handles]


def bert_attention_modules(model):
    return [layer.attention.self for layer in model.encoder.layer]


def llama_attention_modules(model):
    return [layer.self_attn for layer in model.model.layers]


def heads_of(x, n):
    """(B, L, n*D) -> (B, n, L, D)"""
    B, L, _ = x.shape
    return x.view(B, L, n, -1).transpose(1, 2)


def bert_reference(module, hidden, keep):
    """BertSelfAttention by hand: (B, L, hidden) -> (B, L, hidden), float64."""
    H = module.num_attention_heads
    q, k, v = (heads_of(lin(hidden), H) for lin in (module.query, module.key, module.value))
    out, probs = eager_masked_attention(q, k, v, keep)
    return out.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1), probs


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def llama_reference(module, hidden, cos, sin, keep):
    """LlamaAttention by hand, grouped-query heads included: (B, L, hidden) -> (B, L, hidden), float64."""
    cfg = module.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    q, k, v = heads_of(module.q_proj(hidden), H), heads_of(module.k_proj(hidden), Hkv), heads_of(module.v_proj(hidden), Hkv)
    cos, sin = cos[:, None], sin[:, None]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    group = H // Hkv  # query head h reads key/value head h // group
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out, probs = eager_masked_attention(q, k, v, keep)
    out = out.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
    return F.linear(out, module.o_proj.weight.double()), probs


def real_rows(x, real):
    """Select real-token rows of (B, L, ...) -> (n_real, ...)."""
    return x[real]


def encode(tok, texts, side="right"):
    old = tok.padding_side
    tok.padding_side = side
    try:
        return sa.encode(tok, texts)
    finally:
        tok.padding_side = old


# -- a full() plan changes nothing ------------------------------------------------------------------
def test_full_plan_leaves_minilm_unchanged(minilm, tokenizer):
    enc = encode(tokenizer, SENTENCES)
    inputs = {k: v for k, v in enc.items() if k != "sparse_structure"}
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        dense = minilm(**inputs).last_hidden_state
        try:
            sa.sparsify(minilm, "all: full()")
            full = minilm(**enc).last_hidden_state
            sa.sparsify(minilm, "later-half: neighbour(1)")
            sparse = minilm(**enc).last_hidden_state
        finally:
            sa.unsparsify(minilm)
        again = minilm(**inputs).last_hidden_state
    torch.testing.assert_close(full[real], dense[real], atol=1e-5, rtol=1e-5)
    assert (sparse[real] - dense[real]).abs().max() > 1e-2  # the plan really is applied
    assert torch.equal(again, dense)


# -- BERT: outputs equal a hand-written masked attention --------------------------------------------
BERT_PLAN = ("layers=0: neighbour(1) | global_tokens('special'); heads=1,3@layers=1: strided(2) & causal(); "
             "heads=0@layers=1: random(2, seed=1)")


def bert_keep_masks(layout, special):
    """Per layer (B, 4, L, L) keep-masks for BERT_PLAN by hand (head 2 of layer 1 is dense)."""
    real = layout.real
    l0 = hand_mask(real, lambda b, h, i, j, ti, tj: abs(i - j) <= 1 or special[b, ti] or special[b, tj],
                   num_heads=4)
    l1 = hand_mask(real, lambda b, h, i, j, *_: True, num_heads=4)
    l1[:, [1, 3]] = hand_mask(real, lambda b, h, i, j, *_: (i - j) % 2 == 0 and j <= i)
    l1[:, 0] = sa.random(2, seed=1).mask(layout, layer=1, num_heads=4)[:, 0]
    return [l0, l1]


@pytest.mark.parametrize("side", ["right", "left"])
def test_sparsified_bert_equals_hand_written_masked_attention(tokenizer, side):
    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    enc = encode(tokenizer, SENTENCES, side)
    real = enc["attention_mask"].bool()
    layout = make_layout(real.sum(1).tolist(), side)
    assert torch.equal(layout.real, real)
    special = real & (enc["sparse_structure"].word_ids < 0)  # [CLS] and [SEP]
    keeps = bert_keep_masks(layout, special)
    sa.sparsify(model, BERT_PLAN)
    records, remove = capture_attention(bert_attention_modules(model))
    with torch.no_grad():
        model(**enc)
    remove()
    for layer, module in enumerate(bert_attention_modules(model)):
        rec = records[layer]
        hidden = rec["kwargs"].get("hidden_states", rec["args"][0] if rec["args"] else None)
        want, _ = bert_reference(module, hidden, keeps[layer])
        got = rec["output"][0]
        torch.testing.assert_close(real_rows(got, real).double(), real_rows(want, real), atol=ATOL, rtol=ATOL)


def test_similar_uses_the_models_input_embeddings(tokenizer):
    """similar(k) through sparsify: vectors are the model's word embeddings of the input ids."""
    model = tiny_bert(vocab_size=tokenizer.vocab_size, num_hidden_layers=1)
    enc = encode(tokenizer, SENTENCES)
    real = enc["attention_mask"].bool()
    emb = F.normalize(model.get_input_embeddings().weight.detach()[enc["input_ids"]].double(), dim=-1)
    top = {}
    for b in range(real.shape[0]):
        for i in range(int(real[b].sum())):
            sims = [(-float(emb[b, i] @ emb[b, j]), j) for j in range(int(real[b].sum())) if j != i]
            top[b, i] = {j for _, j in sorted(sims)[:2]}  # most similar first; ties: the earlier key
    keep = hand_mask(real, lambda b, h, i, j, *_: j in top[b, i], num_heads=4)
    sa.sparsify(model, "all: similar(2)")
    records, remove = capture_attention(bert_attention_modules(model))
    with torch.no_grad():
        model(**enc)
    remove()
    module, rec = bert_attention_modules(model)[0], records[0]
    hidden = rec["kwargs"].get("hidden_states", rec["args"][0] if rec["args"] else None)
    want, _ = bert_reference(module, hidden, keep)
    torch.testing.assert_close(rec["output"][0][real].double(), want[real], atol=ATOL, rtol=ATOL)


def test_roberta_full_is_unchanged_and_neighbour_is_banded():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, vocab_size=120, max_position_embeddings=40)).eval()
    ids = torch.randint(3, 120, (2, 9))
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    ids[1, 6:] = model.config.pad_token_id
    real = am.bool()
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=am).last_hidden_state
        sa.sparsify(model, "all: full()")
        full = model(input_ids=ids, attention_mask=am).last_hidden_state
        sa.sparsify(model, "all: neighbour(1)")
        out = model(input_ids=ids, attention_mask=am, output_attentions=True)
    torch.testing.assert_close(full[real], dense[real], atol=1e-5, rtol=1e-5)
    keep = hand_mask(real, lambda b, h, i, j, *_: abs(i - j) <= 1)
    for probs in out.attentions:
        rows = real[:, None, :].expand(-1, 4, -1)
        assert (probs[rows][~keep.expand(-1, 4, -1, -1)[rows]] == 0).all()


def test_positional_arguments_are_read_like_keywords(tokenizer):
    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    sa.sparsify(model, "all: neighbour(1) | random(2)")
    enc = encode(tokenizer, SENTENCES)
    with torch.no_grad():
        a = model(enc["input_ids"], enc["attention_mask"]).last_hidden_state
        b = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    assert torch.equal(a, b)


# -- gradients ---------------------------------------------------------------------------------------
class HandMaskedAttention:
    """An attention function for transformers' AttentionInterface that applies given keep-masks
    with the plain eager formula (a reference model to compare outputs and gradients with)."""

    name = "sparseattn_test_hand_eager"

    def __init__(self, keeps, real):
        self.keeps, self.real = keeps, real

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        keep = self.keeps[module.layer_idx].expand(-1, query.shape[1], -1, -1)
        # padding queries look at the real keys (their outputs never reach a real token)
        keep = keep | (~self.real[:, None, :, None] & self.real[:, None, None, :])
        scores = (query @ key.transpose(-1, -2)) * scaling
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        return (probs @ value).transpose(1, 2).contiguous(), probs

    def install(self, model):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(self.name, self)
        AttentionMaskInterface.register(self.name, sdpa_mask)
        model.set_attn_implementation(self.name)
        return model


def test_gradients_flow_and_equal_the_reference(tokenizer):
    model = tiny_bert("classification", vocab_size=tokenizer.vocab_size, num_labels=3)
    enc = encode(tokenizer, SENTENCES)
    real = enc["attention_mask"].bool()
    layout = make_layout(real.sum(1).tolist())
    special = real & (enc["sparse_structure"].word_ids < 0)
    reference = HandMaskedAttention(bert_keep_masks(layout, special), real).install(copy.deepcopy(model))
    sa.sparsify(model, BERT_PLAN)
    labels = torch.tensor([0, 2, 1])
    inputs = {k: v for k, v in enc.items() if k != "sparse_structure"}
    out = model(**enc, labels=labels)
    ref = reference(**inputs, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=ATOL)
    out.loss.backward()
    ref.loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"zero or non-finite gradient for {name}"
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_of_a_token_reaches_only_its_neighbours():
    """One layer of neighbour(1): output i depends on input j only when |i - j| <= 1."""
    model = tiny_bert(num_hidden_layers=1)
    sa.sparsify(model, "all: neighbour(1)")
    L = 7
    x = torch.randn(1, L, 32, requires_grad=True)
    out = model(inputs_embeds=x).last_hidden_state
    w = torch.randn(32)  # not .sum(): a LayerNorm output (gain 1, bias 0) sums to a constant
    for i in range(L):
        (g,) = torch.autograd.grad(out[0, i] @ w, x, retain_graph=True)
        reached = g[0].abs().sum(-1) > 0
        assert reached.tolist() == [abs(i - j) <= 1 for j in range(L)], f"query {i}"


# -- padding, dropout --------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_honoured(tokenizer, side):
    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    sa.sparsify(model, "layers=0: neighbour(1) | random(2) | global_tokens('special'); layers=1: lexical()",
                tokenizer=tokenizer)
    batch = encode(tokenizer, SENTENCES, side)
    real = batch["attention_mask"].bool()
    # BERT's absolute positions must count real tokens too, or left padding shifts them
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        together = model(**batch).last_hidden_state
        for b, text in enumerate(SENTENCES):
            alone = model(**sa.encode(tokenizer, [text])).last_hidden_state[0]
            torch.testing.assert_close(together[b][real[b]], alone, atol=ATOL, rtol=ATOL)


def test_attention_dropout_applies_in_train_mode_only(tokenizer):
    enc = encode(tokenizer, SENTENCES)
    model = tiny_bert(vocab_size=tokenizer.vocab_size, attention_probs_dropout_prob=0.5)
    sa.sparsify(model, "all: neighbour(2)")
    with torch.no_grad():
        model.train()
        a, b = model(**enc).last_hidden_state, model(**enc).last_hidden_state
        wa = model(**enc, output_attentions=True).last_hidden_state
        model.eval()
        c, d = model(**enc).last_hidden_state, model(**enc).last_hidden_state
    assert not torch.allclose(a, b) and not torch.allclose(a, wa)  # both code paths drop
    assert torch.equal(c, d)
    # with no attention dropout configured, train mode is deterministic (only attention dropout is random here)
    model = tiny_bert(vocab_size=tokenizer.vocab_size, attention_probs_dropout_prob=0.0).train()
    sa.sparsify(model, "all: neighbour(2)")
    with torch.no_grad():
        assert torch.equal(model(**enc).last_hidden_state, model(**enc).last_hidden_state)


# -- output_attentions -------------------------------------------------------------------------------
def test_output_attentions_are_zero_outside_the_mask(tokenizer):
    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    enc = encode(tokenizer, SENTENCES)
    real = enc["attention_mask"].bool()
    layout = make_layout(real.sum(1).tolist())
    special = real & (enc["sparse_structure"].word_ids < 0)
    keeps = bert_keep_masks(layout, special)
    sa.sparsify(model, BERT_PLAN)
    records, remove = capture_attention(bert_attention_modules(model))
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    remove()
    assert len(out.attentions) == 2
    for layer, probs in enumerate(out.attentions):
        assert probs.shape == (3, 4, real.shape[1], real.shape[1])
        rows = real[:, None, :].expand(-1, 4, -1)  # real queries
        p = probs[rows]
        k = keeps[layer].expand(-1, 4, -1, -1)[rows]
        assert (p[~k] == 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[0]))
        hidden = records[layer]["kwargs"].get("hidden_states", records[layer]["args"][0])
        _, want = bert_reference(bert_attention_modules(model)[layer], hidden, keeps[layer])
        torch.testing.assert_close(p.double(), want.expand(-1, 4, -1, -1)[rows], atol=ATOL, rtol=ATOL)


def test_output_attentions_from_the_config(tokenizer):
    """Models loaded with output_attentions=True (in the config, not the call) get their probabilities too."""
    model = tiny_bert(vocab_size=tokenizer.vocab_size, output_attentions=True)
    enc = encode(tokenizer, SENTENCES[:2])
    sa.sparsify(model, "all: neighbour(1)")
    with torch.no_grad():
        out = model(**enc)
    assert len(out.attentions) == 2 and all(a is not None for a in out.attentions)
    L = enc["input_ids"].shape[1]
    band = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs() <= 1
    assert (out.attentions[0][0, :, ~band] == 0).all()


# -- Llama-family decoders ---------------------------------------------------------------------------
LLAMA_PLANS = {
    "neighbour": ("all: neighbour(2)", lambda real: [hand_mask(real, lambda b, h, i, j, *_: abs(i - j) <= 2,
                                                               causal=True, num_heads=4)] * 2),
    "per-head": ("heads=0,3@layers=0: neighbour(1); heads=1@layers=0: global_tokens(1); layers=1: strided(2)",
                 lambda real: [torch.cat([hand_mask(real, lambda b, h, i, j, *_: abs(i - j) <= 1, causal=True),
                                          hand_mask(real, lambda b, h, i, j, *_: i < 1 or j < 1, causal=True),
                                          hand_mask(real, lambda *_: True, causal=True),
                                          hand_mask(real, lambda b, h, i, j, *_: abs(i - j) <= 1, causal=True)], 1),
                               hand_mask(real, lambda b, h, i, j, *_: (i - j) % 2 == 0, causal=True, num_heads=4)]),
}


def llama_batch(lengths=(9, 5, 1), seed=0):
    """Left-padded random ids with position ids counted over real tokens (as generate does)."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(3, 120, (len(lengths), L), generator=g)
    am = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        am[b, L - n:] = 1
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": am, "position_ids": pos}


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("plan", sorted(LLAMA_PLANS))
def test_sparsified_llama_equals_hand_written_masked_attention(plan, device):
    model = tiny_llama().to(device)
    spec, keeps_of = LLAMA_PLANS[plan]
    batch = llama_batch()
    real = batch["attention_mask"].bool()
    keeps = [k.to(device) for k in keeps_of(real)]
    batch, real = {k: v.to(device) for k, v in batch.items()}, real.to(device)
    sa.sparsify(model, spec)
    records, remove = capture_attention(llama_attention_modules(model))
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    remove()
    for layer, module in enumerate(llama_attention_modules(model)):
        rec = records[layer]
        hidden = rec["kwargs"].get("hidden_states", rec["args"][0] if rec["args"] else None)
        cos, sin = rec["kwargs"]["position_embeddings"]
        want, probs = llama_reference(module, hidden, cos, sin, keeps[layer])
        torch.testing.assert_close(rec["output"][0][real].double(), want[real], atol=ATOL, rtol=ATOL)
        got_p = out.attentions[layer]
        rows = real[:, None, :].expand(-1, 4, -1)
        torch.testing.assert_close(got_p[rows].double(), probs[rows], atol=ATOL, rtol=ATOL)
        assert (got_p[rows][~keeps[layer][rows]] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reference_backend_in_bf16_on_cuda_with_left_padding():
    """SDPA's GPU kernels with boolean masks, left padding (padding queries of a decoder have no key at
    all) and bf16: finite everywhere, within bf16 error of the fp32 run, gradients finite."""
    model = tiny_llama().cuda()
    sa.sparsify(model, "all: neighbour(2) | random(1)")
    batch = {k: v.cuda() for k, v in llama_batch((9, 5, 1)).items()}
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        fp32 = model(**batch).logits
    model.to(torch.bfloat16)
    out = model(**batch).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float()[real], fp32[real], atol=3e-2, rtol=3e-2)
    out.float()[real].square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_llama_never_attends_to_the_future():
    model = tiny_llama()
    sa.sparsify(model, "all: neighbour(2) | global_tokens(1) | random(2)")
    batch = llama_batch((8,))
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][0, 5:] = (changed["input_ids"][0, 5:] + 7) % 120
        out2 = model(**changed)
    future = torch.triu(torch.ones(8, 8, dtype=torch.bool), diagonal=1)
    for probs in out.attentions:
        assert (probs[0][:, future] == 0).all()
    torch.testing.assert_close(out.logits[0, :5], out2.logits[0, :5], atol=1e-6, rtol=0)
    assert (out.logits[0, 5:] - out2.logits[0, 5:]).abs().max() > 1e-3


def test_llama_left_padding_is_honoured():
    model = tiny_llama()
    sa.sparsify(model, "all: neighbour(2) | random(1)")
    batch = llama_batch((9, 5, 1))
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        together = model(**batch).logits
        for b in range(3):
            ids = batch["input_ids"][b][real[b]][None]
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(together[b][real[b]], alone, atol=ATOL, rtol=ATOL)


def test_llama_incremental_decoding_matches_a_full_forward():
    model = tiny_llama()
    sa.sparsify(model, "all: neighbour(2) | global_tokens(1)")
    batch = llama_batch((7, 4))
    with torch.no_grad():
        full = model(**batch).logits
        head = {k: v[:, :5] for k, v in batch.items()}
        out = model(**head, use_cache=True)
        past = out.past_key_values
        for t in range(5, 7):
            step = model(input_ids=batch["input_ids"][:, t:t + 1], attention_mask=batch["attention_mask"][:, :t + 1],
                         position_ids=batch["position_ids"][:, t:t + 1], past_key_values=past, use_cache=True)
            past = step.past_key_values
            torch.testing.assert_close(step.logits[:, 0], full[:, t], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_unsparsify_restores_identical_outputs(which, tokenizer):
    if which == "bert":
        model = tiny_bert(vocab_size=tokenizer.vocab_size)
        enc = encode(tokenizer, SENTENCES)
        inputs = {k: v for k, v in enc.items() if k != "sparse_structure"}
        run = lambda: model(**inputs).last_hidden_state  # noqa: E731
    else:
        model = tiny_llama()
        inputs = llama_batch()
        run = lambda: model(**inputs).logits  # noqa: E731
    impl = model.config._attn_implementation
    with torch.no_grad():
        before = run()
        sa.sparsify(model, "all: neighbour(1)")
        sparse = run()
        sa.unsparsify(model)
        after = run()
    assert not torch.allclose(before, sparse)
    assert torch.equal(before, after)
    assert model.config._attn_implementation == impl
    assert sa.plan_of(model) is None and not model._forward_pre_hooks
    assert not any(hasattr(m, "_sparseattn_state") or hasattr(m, "_sparseattn_dense") for m in model.modules())
    sa.unsparsify(model)  # a second call is harmless


def test_sparsify_twice_replaces_the_plan(tokenizer):
    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    enc = encode(tokenizer, SENTENCES)
    with torch.no_grad():
        sa.sparsify(model, "all: neighbour(1)")
        a = model(**enc).last_hidden_state
        sa.sparsify(model, "all: neighbour(3)")
        b = model(**enc).last_hidden_state
        sa.unsparsify(model)
        sa.sparsify(model, "all: neighbour(3)")
        c = model(**enc).last_hidden_state
    assert len(model._forward_pre_hooks) == 1
    assert not torch.allclose(a, b) and torch.equal(b, c)


def test_distilbert_without_layer_idx_maps_attention_modules_by_order():
    """DistilBERT's attention modules carry no layer_idx: one per layer, in order, is the layer order."""
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    m = DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
                                         max_position_embeddings=40)).eval()
    ids = torch.randint(3, 50, (2, 12))
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=am).last_hidden_state
    sa.sparsify(m, "full()")
    with torch.no_grad():
        same = m(input_ids=ids, attention_mask=am).last_hidden_state
    assert torch.equal(same[am.bool()], ref[am.bool()])
    sa.sparsify(m, "layers=2: neighbour(1)")
    with torch.no_grad():
        att = m(input_ids=ids, attention_mask=am, output_attentions=True).attentions
    dist = (torch.arange(12)[:, None] - torch.arange(12)[None, :]).abs()
    assert (att[2][0][:, dist > 1] == 0).all()  # layer 2 is sparsified...
    assert (att[1][0][:, dist > 1] > 0).any()  # ...layer 1 is not
    rep = sa.measure_sparsity(m, {"input_ids": ids, "attention_mask": am})
    assert rep.per_layer[:2].tolist() == [0.0, 0.0] and rep.per_layer[2] > 0.5


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_gradient_checkpointing_recomputes_each_layer_with_its_own_batch(arch):
    """Two forward passes (different padding), then their backward passes in reverse order, with gradient
    checkpointing: recomputation must use each pass's own layout, not the latest one."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    def grads(checkpointing: bool):
        torch.manual_seed(0)
        if arch == "bert":
            m = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        else:
            m = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2))
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        sa.sparsify(m, "all: neighbour(1) | global_tokens(1)")
        g = torch.Generator().manual_seed(1)
        ids1, ids2 = torch.randint(3, 50, (2, 10), generator=g), torch.randint(3, 50, (2, 10), generator=g)
        am1, am2 = torch.ones_like(ids1), torch.ones_like(ids2)
        am1[1, :4] = 0 if arch == "llama" else 1  # left padding for the decoder,
        am1[1, 4:] = 1 if arch == "llama" else 0  # right padding for the encoder
        am2[0, 6:] = 0 if arch == "bert" else 1
        am2[0, :3] = 0 if arch == "llama" else 1
        out1 = m(input_ids=ids1, attention_mask=am1).last_hidden_state
        out2 = m(input_ids=ids2, attention_mask=am2).last_hidden_state
        out2[am2.bool()].sum().backward()
        out1[am1.bool()].pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


# -- the model's mask: skipped where the layout knows its structure ----------------------------------
class _MaskSpy(sa.backends.ReferenceBackend):
    """The reference backend, recording whether each call came with a materialized mask."""

    def __init__(self):
        self.masks = []

    def attention(self, call):
        self.masks.append(None if call.model_mask is None else tuple(call.model_mask.shape))
        return super().attention(call)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_unpadded_batches_get_no_materialized_mask_and_the_same_outputs(arch):
    plan = "all: neighbour(1) | global_tokens(1) | random(1)"
    model = tiny_bert() if arch == "bert" else tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 11), generator=g)
    spy = _MaskSpy()
    sa.sparsify(model, plan, backend=spy)
    assert model.config._attn_implementation == "sparseattn"
    with torch.no_grad():
        lean = model(input_ids=ids)[0]
        assert spy.masks and all(m is None for m in spy.masks)  # no L x L mask for an unpadded batch
        spy.masks.clear()
        padded = model(input_ids=ids, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0))[0]
        # padding: still no L x L mask; the layout carries the padding (from the 2-D attention mask)
        assert spy.masks and all(m is None for m in spy.masks)
        model.set_attn_implementation("sparseattn_full_mask")  # the same plan with the mask always materialized
        spy.masks.clear()
        full = model(input_ids=ids)[0]
        assert all(m == (2, 1, 11, 11) for m in spy.masks)
    torch.testing.assert_close(lean, full, atol=1e-6, rtol=1e-6)  # causality (llama) kept without the mask
    assert not torch.allclose(lean[:, 1:], padded[:, 1:], atol=1e-4)  # the padding mask did change something


class _EagerMaskSpy(_MaskSpy):
    """_MaskSpy run outside torch.compile's graphs, as the block backend is."""

    @torch.compiler.disable
    def attention(self, call):
        return super().attention(call)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_unpadded_batches_get_no_materialized_mask_under_torch_compile(arch, monkeypatch):
    """Under torch.compile, transformers materializes the L x L mask even for a batch given without one where
    dynamo reads torch.compiler.is_exporting() as True (torch before 2.14, emulated here whatever the version):
    the sparsified model's mask function skips it, as outside compile, so the block backend keeps its
    sync-free path; a padded batch gets none either (its layout carries the padding)."""
    import torch._dynamo
    from transformers import masking_utils

    # the name transformers >= 5.2x reads; earlier versions (5.17, the GPU image's) decide otherwise
    monkeypatch.setattr(masking_utils, "is_torchdynamo_exporting", lambda: torch.compiler.is_compiling(),
                        raising=False)

    model = tiny_bert() if arch == "bert" else tiny_llama()
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    spy = _EagerMaskSpy()
    sa.sparsify(model, "all: neighbour(1) | global_tokens(1)", backend=spy)
    with torch.no_grad():
        eager = model(input_ids=ids)[0]
        torch._dynamo.reset()
        compiled_model = torch.compile(model)
        spy.masks.clear()
        compiled = compiled_model(input_ids=ids)[0]
        assert spy.masks and all(m is None for m in spy.masks)
        spy.masks.clear()
        compiled_model(input_ids=ids, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0))
        assert spy.masks and all(m is None for m in spy.masks)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_compile_outside_attention_leaves_attention_modules_alone_and_outputs_unchanged(arch):
    import torch._dynamo

    model = tiny_bert("classify") if arch == "bert" else tiny_llama()
    ids = torch.randint(3, 100, (2, 13), generator=torch.Generator().manual_seed(0))
    sa.sparsify(model, "all: neighbour(2) | global_tokens(1)")
    with torch.no_grad():
        want = model(input_ids=ids).logits
    names_before = [n for n, _ in model.named_parameters()]
    torch._dynamo.reset()
    compiled = sa.compile_outside_attention(model)
    is_compiled = {n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert set(compiled) == is_compiled
    attention = {n for n, m in model.named_modules() if type(m).__name__ in ("BertSelfAttention", "LlamaAttention")}
    assert attention and not any(a == c or a.startswith(c + ".") or c.startswith(a + ".")
                                 for a in attention for c in compiled)  # nothing holding or held by attention
    expected = ({"bert.embeddings", "bert.pooler", "classifier", "bert.encoder.layer.0.intermediate",
                 "bert.encoder.layer.1.output", "bert.encoder.layer.0.attention.output"} if arch == "bert"
                else {"model.embed_tokens", "model.norm", "lm_head", "model.layers.0.mlp",
                      "model.layers.1.input_layernorm"})
    assert expected <= set(compiled)
    assert [n for n, _ in model.named_parameters()] == names_before
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_modules_that_do_not_say_whether_they_are_causal_always_get_the_mask():
    model = tiny_bert()
    for m in bert_attention_modules(model):
        del m.is_causal
    sa.sparsify(model, "all: neighbour(1)")
    assert model.config._attn_implementation == "sparseattn_full_mask"
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    ref_model = tiny_bert()
    sa.sparsify(ref_model, "all: neighbour(1)")
    with torch.no_grad():
        ref = ref_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    sa.unsparsify(model)
    assert model.config._attn_implementation != "sparseattn_full_mask"


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_attention_outside_a_call_of_the_sparsified_model_is_refused(arch):
    """model.forward() and calls of a submodule skip the model's forward hook, which reads each pass's padding:
    the layers would run on another pass's inputs, so they refuse with a message that says what to call. A
    failed call leaves nothing behind, and the model itself keeps working."""
    import torch._dynamo

    model = tiny_bert("classify") if arch == "bert" else tiny_llama()
    sa.sparsify(model, "all: neighbour(2) | global_tokens(1)")
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        inner = model.bert if arch == "bert" else model.model
        for call in (lambda: model.forward(input_ids=ids, attention_mask=mask),
                     lambda: inner(input_ids=ids, attention_mask=mask)):
            with pytest.raises(RuntimeError, match=r"of layer 0 ran outside a call of the model given to "
                                                   r"sparseattn\.sparsify\(\).*Call the model itself"):
                call()
        with pytest.raises(IndexError):
            model(input_ids=torch.full((1, 4), 10_000))  # an error inside the pass: the hook count recovers
        with pytest.raises(RuntimeError, match="ran outside a call"):
            model.forward(input_ids=ids, attention_mask=mask)
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match="ran outside a call"):  # compiled, the hook is skipped all the same
            torch.compile(model.forward, backend="eager")(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want)
    sa.unsparsify(model)
    with torch.no_grad():
        model.forward(input_ids=ids, attention_mask=mask)  # unsparsified: plain transformers again


def test_a_sparsified_model_saved_after_use_runs_in_a_fresh_process(tmp_path):
    """torch.save of a sparsified model after a forward pass (the pass's inputs are not kept) and torch.load in a
    new process, where sparseattn's attention is registered on unpickling: the same logits."""
    import os
    import subprocess
    import sys

    model = tiny_llama()
    sa.sparsify(model, "all: neighbour(2) | global_tokens(1)")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    torch.save({"model": model, "ids": ids, "mask": mask}, tmp_path / "model.pt")
    code = ("import sys, torch\n"
            "d = torch.load(sys.argv[1], weights_only=False)\n"
            "with torch.no_grad():\n"
            "    torch.save(d['model'](input_ids=d['ids'], attention_mask=d['mask']).logits, sys.argv[2])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt"), str(tmp_path / "logits.pt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = torch.load(tmp_path / "logits.pt")
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real])
