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
    return BlockSparseBackend(block_size=32, force=True, kernel="triton")


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
@pytest.mark.parametrize("how", ["padded", "packed-positions", "packed-cu"])
@pytest.mark.parametrize("backend", ["reference", "block"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_each_sequence_as_if_alone(arch, backend, how, device):
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
    if backend == "block":  # the kernel ran (segments), not a fallback
        assert model._sparseattn.backend.stats["block"] >= 2 * 2


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
