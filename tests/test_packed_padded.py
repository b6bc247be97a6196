"""Padded and packed batches through whole models: every sequence's outputs, and the parameters' gradients of a
loss summed over sequences, equal those of running each sequence alone, on the reference and block backends
(the block backend's Triton kernel runs in Triton's interpreter on the CPU, compiled on the GPU). Packed rows
come as transformers' flattening collator makes them: position_ids restarting at 0, with or without
cu_seq_lens_q."""

import pytest
import torch

import sparseattn as sa
from sparseattn.backends import BlockSparseBackend, ReferenceBackend
from conftest import tiny_bert, tiny_llama

DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])
LENGTHS = [13, 37, 7]  # odd lengths, one longer than a 32-token tile, documents crossing tile edges
PLAN = "all: neighbour(3) | global_tokens(1)"


def _backend(name, device):
    if name == "reference":
        return ReferenceBackend()
    # block-fused: the backward's dK/dV pass also adds dQ atomically (no dQ pass)
    return BlockSparseBackend(block_size=32, force=True, kernel="triton",
                              backward="fused" if name == "block-fused" else "auto")


def _model(arch, device):
    model = tiny_bert() if arch == "bert" else tiny_llama()
    return model.to(device).train()


def _output(model, out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def _sequences(device):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 120, (n,), generator=g).to(device) for n in LENGTHS]


def _run_alone(model, seqs):
    outs = []
    for ids in seqs:
        outs.append(_output(model, model(input_ids=ids[None]))[0])
    loss = sum((o.float() ** 2).mean() for o in outs)
    loss.backward()
    return outs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run_batched(model, seqs, how, device):
    total = sum(len(s) for s in seqs)
    if how == "padded":
        L = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), L, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = s, 1
        out = _output(model, model(input_ids=ids, attention_mask=mask))
        outs = [out[i, :len(s)] for i, s in enumerate(seqs)]
    elif how == "padding-free":  # a padded batch made one packed row by sa.unpad (a padding segment at its end)
        L = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = s.cpu(), 1
        packed = sa.unpad({"input_ids": ids, "attention_mask": mask}, multiple_of=32)
        assert packed["input_ids"].shape == (1, 64) and packed["attention_mask"].sum() == total
        out = sa.repad(_output(model, model(**packed.to(device))), packed)
        assert out.shape[:2] == (len(seqs), L) and not out[mask.to(device) == 0].any()
        outs = [out[i, :len(s)] for i, s in enumerate(seqs)]
    else:
        ids = torch.cat(seqs)[None]
        pos = torch.cat([torch.arange(len(s), device=device) for s in seqs])[None]
        kw = {"position_ids": pos}
        if how == "packed-cu":
            cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=device)
            kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
        out = _output(model, model(input_ids=ids, **kw))[0]
        assert out.shape[0] == total
        starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
        outs = [out[a:b] for a, b in zip(starts, starts[1:])]
    loss = sum((o.float() ** 2).mean() for o in outs)
    loss.backward()
    return outs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["padded", "packed-positions", "packed-cu", "padding-free"])
@pytest.mark.parametrize("backend", ["reference", "block", "block-fused"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_each_sequence_as_if_alone(arch, backend, how, device, monkeypatch):
    from sparseattn.backends import triton_kernel

    modes = []  # the backward passes the kernel ran: the backend's choice reaches the kernel
    inner = triton_kernel.backward_pass
    monkeypatch.setattr(triton_kernel, "backward_pass", lambda *a, **kw: modes.append(a[8]) or inner(*a, **kw))
    model = _model(arch, device)
    sa.sparsify(model, PLAN, backend=_backend(backend, device))
    seqs = _sequences(device)
    want, want_grads = _run_alone(model, seqs)
    model.zero_grad(set_to_none=True)
    got, got_grads = _run_batched(model, seqs, how, device)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"sequence {i}: {m}")
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 8
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=2e-5, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    if backend != "reference":  # the kernel ran (segments), not a fallback
        assert model._sparseattn.backend.stats["block"] >= 2 * 2
        assert set(modes) == {"fused" if backend == "block-fused" else "two-pass"}


def test_packed_rows_do_not_attend_across_documents_with_plain_sdpa_either():
    """The dense layers of a sparsified model keep documents apart too (the issue's counter-example: transformers'
    own SDPA attends across documents packed with restarting position_ids)."""
    model = tiny_llama()
    sa.sparsify(model, "layers=0: neighbour(3)")  # layer 1 stays dense
    seqs = _sequences("cpu")
    with torch.no_grad():
        want = [model(input_ids=s[None]).logits[0] for s in seqs]
        pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        got = model(input_ids=torch.cat(seqs)[None], position_ids=pos).logits[0]
    torch.testing.assert_close(got, torch.cat(want), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pack", [True, 40])
def test_encode_pack_gives_each_example_its_own_attention(pack):
    """sa.encode(..., pack=...) on the packaged MiniLM: every example's hidden states equal those of the usual
    padded batch, under a plan and under the dense plan (one row of all examples, or rows of 40 tokens ending in
    padding); one row without padding also for the model as transformers >= 5.25 runs it (it finds the
    documents from position_ids only where there is no attention mask; 5.17 does not, and attends across them)."""
    import transformers
    from packaging.version import Version

    from sparseattn.models import load_model, load_tokenizer

    tok, model = load_tokenizer(), load_model()
    texts = ["The cat sat on the mat.", "A much longer sentence about sparse attention and its patterns, with commas.",
             "Short one.", "Another example that goes on for a while, to fill the rows."]
    for plan in ("all: neighbour(2) | global_tokens(1)", sa.Plan.dense(), None):
        if plan is None and (pack is not True or Version(transformers.__version__) < Version("5.25")):
            continue
        if plan is not None:
            sa.sparsify(model, plan)
        with torch.no_grad():
            padded = sa.encode(tok, texts)
            want = model(**padded).last_hidden_state
            packed = sa.encode(tok, texts, pack=pack)
            if pack is not True:
                assert packed["input_ids"].shape[1] == 40 and packed["input_ids"].shape[0] > 1
            got = model(**packed).last_hidden_state.reshape(-1, want.shape[-1])
        for i, n in enumerate(padded["attention_mask"].sum(1).tolist()):
            s = int(packed.example_starts[i])
            torch.testing.assert_close(got[s:s + n], want[i, :n], atol=1e-5, rtol=1e-4)
        sa.unsparsify(model)


def _left_padded(seqs):
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):], mask[i, L - len(s):] = s, 1
    return ids, mask


@pytest.mark.parametrize("plan", [PLAN, "all: strided(4) | global_tokens(2)"])
def test_unpad_a_left_padded_decoder_batch_gives_the_padded_batchs_logits(plan):
    """Generation-style left padding: the packed row's logits, put back by repad, are the padded batch's at every
    real token (positions kept as the padded batch numbers them), and repad's zeros are at its padding."""
    model = tiny_llama()
    sa.sparsify(model, plan)
    ids, mask = _left_padded(_sequences("cpu"))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        packed = sa.unpad({"input_ids": ids, "attention_mask": mask})
        got = sa.repad(model(**packed).logits, packed)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    assert not got[~real].any()
    assert packed.example_lengths.tolist() == LENGTHS and packed.example_starts.tolist() == [0, 13, 50]


def test_unpad_packs_token_types_and_given_positions_and_marks_its_tail():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids > 0).long()
    types = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    pos = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    packed = sa.unpad({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "position_ids": pos},
                      multiple_of=4, pad_id=1)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 1, 1]]
    assert packed["token_type_ids"].tolist() == [[0, 1, 1, 0, 1, 0, 0, 0]]
    assert packed["position_ids"].tolist() == [[3, 4, 5, 7, 8, 0, 1, 2]]
    assert packed["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    assert packed["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and packed["cu_seq_lens_q"].dtype == torch.int32
    assert packed["max_length_q"] == 3
    hidden = torch.arange(8.0)[None, :, None].expand(1, 8, 2)
    assert sa.repad(hidden, packed)[..., 0].tolist() == [[0, 1, 2, 0], [3, 4, 0, 0]]


@pytest.mark.parametrize("plan", [PLAN, "dense"])
def test_unpad_packs_token_labels_so_a_causal_lms_loss_is_the_padded_batchs(plan):
    """A causal LM trained padding-free: labels pack like the tokens, the first of each example -100 (as transformers'
    flattening collator makes them), so the shifted loss over the packed row is the padded batch's, gradients too; the
    padding segment's labels are -100."""
    ids, mask = _left_padded(_sequences("cpu"))
    ids, mask = ids.flip(1), mask.flip(1)  # right padding, as a training collator pads
    labels = ids.masked_fill(mask == 0, -100)
    losses, grads = [], []
    for packed_row in (False, True):
        model = tiny_llama()
        sa.sparsify(model, sa.Plan.dense() if plan == "dense" else plan)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if packed_row:
            batch = sa.unpad(batch, multiple_of=16)
            width = batch["input_ids"].shape[1]
            starts = batch.example_starts.tolist()
            assert batch["labels"][0, starts].eq(-100).all() and batch["labels"][0, sum(LENGTHS):].eq(-100).all()
            assert width > sum(LENGTHS) and int((batch["labels"] != -100).sum()) == sum(n - 1 for n in LENGTHS)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.model.embed_tokens.weight.grad.clone())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_unpad_names_what_it_cannot_pack():
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"row 1 of attention_mask has 2 runs"):
        sa.unpad({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 0, 0]])})
    with pytest.raises(ValueError, match=r"row 0 of attention_mask has no real token"):
        sa.unpad({"input_ids": ids, "attention_mask": torch.tensor([[0, 0, 0, 0, 0], [1, 1, 0, 0, 0]])})
    with pytest.raises(ValueError, match=r"labels must be token labels of input_ids' shape \(2, 5\), got a tensor of "
                                         r"shape \(2,\); one label per example"):
        sa.unpad({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match=r"the batch has 'pixel_values', which a packed row does not take"):
        sa.unpad({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": ids})
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of input_ids' shape \(2, 5\), got nothing"):
        sa.unpad({"input_ids": ids})
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"multiple_of must be a whole number >= 1, got {bad!r}"):
            sa.unpad({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, multiple_of=bad)
    with pytest.raises(ValueError, match=r"no tokens \(input_ids of shape \(0, 5\)\)"):
        sa.unpad({"input_ids": ids[:0], "attention_mask": ids[:0]})
    packed = sa.unpad({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with pytest.raises(ValueError, match=r"outputs have shape \(2, 5, 3\); the packed row's token outputs have shape "
                                         r"\(1, 10, \.\.\.\)"):
        sa.repad(torch.zeros(2, 5, 3), packed)
    with pytest.raises(ValueError, match="repad needs the batch sparseattn.unpad made"):
        sa.repad(torch.zeros(1, 10, 3), {"input_ids": ids})


@pytest.mark.parametrize("backend", ["reference", "block"])
def test_packed_rows_without_a_cache_come_without_the_models_own_mask(backend, monkeypatch):
    """With use_cache=False transformers finds packed rows from position_ids itself and makes an L x L mask of
    causality within documents. The layout holds exactly that, so sparseattn's mask function makes none (a mask of
    the model's own would send the block backend to a layout built per batch): every layer gets no mask, and each
    document's logits are its own."""
    model = tiny_llama().eval()
    sa.sparsify(model, PLAN, backend=_backend(backend, "cpu"))
    masks = []
    attention = model._sparseattn.backend.attention
    monkeypatch.setattr(model._sparseattn.backend, "attention", lambda call: masks.append(call.model_mask)
                        or attention(call))
    seqs = _sequences("cpu")
    with torch.no_grad():
        want = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in seqs])
        masks.clear()
        pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        got = model(input_ids=torch.cat(seqs)[None], position_ids=pos, use_cache=False).logits[0]
    assert len(masks) == 2 and all(m is None for m in masks)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_documents_from_position_ids_split_where_transformers_splits_them():
    """A document starts wherever the positions do not go up by one, as in transformers' own packed masks: a row
    that begins inside a document (positions not starting at 0) keeps it apart from the next one."""
    from transformers.masking_utils import find_packed_sequence_indices

    from sparseattn.layout import TokenLayout

    pos = torch.tensor([[3, 4, 5, 0, 1, 0, 1, 2], [0, 1, 2, 3, 0, 0, 1, 2]])
    docs = TokenLayout.from_position_ids(pos).document_ids
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 2, 2, 2]]
    assert torch.equal(docs, find_packed_sequence_indices(pos))
