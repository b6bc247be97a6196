"""Why dense SDPA decodes slowly in `sparseattn bench generate` (docs/benchmarks.md, tenth round: 72 ms a token for
a 1B-shaped Llama at 32k, batch 1, where FlexAttention takes 24 ms over the same cache). The hypothesis to test:
PyTorch picks cuDNN attention on Hopper, and cuDNN builds a new execution plan on the host whenever the key length
changes, which a growing KV cache does at every decoding step. About a minute on an H200:

    PYTHONPATH=src python benchmarks/decode_sdpa_backend.py        # DEV=cpu L=256 for a smoke run

Confirmed if SDPA picks CUDNN_ATTENTION, cuDNN with a new key length each call costs milliseconds against
microseconds at a fixed length (or with flash), and the decode step drops from ~70 ms to ~20 ms with flash only.
"""

import contextlib
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

DEV = os.environ.get("DEV", "cuda")
L = int(os.environ.get("L", 32768))
GPU = DEV == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32


def sync():
    if GPU:
        torch.cuda.synchronize()


def sdpa_alone(backend, new_length_each_call: bool) -> float:
    """ms per call of SDPA on a decode query (1 x 32 heads) over 8 key/value heads of about L keys."""
    q = torch.randn(1, 1, 32, 64, device=DEV, dtype=DTYPE).transpose(1, 2)  # as Llama makes it
    keys = [torch.randn(1, 8, L + i, 64, device=DEV, dtype=DTYPE) for i in range(10)]
    with sdpa_kernel([backend]):
        F.scaled_dot_product_attention(q, keys[0], keys[0], enable_gqa=True)
        sync()
        t = time.perf_counter()
        for i in range(1, 10):
            k = keys[i] if new_length_each_call else keys[0]
            F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        sync()
    return (time.perf_counter() - t) / 9 * 1e3


def main():
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
          torch.cuda.get_device_name() if GPU else "cpu")
    q = torch.randn(1, 32, 1, 64, device=DEV, dtype=DTYPE)
    k = torch.randn(1, 8, L, 64, device=DEV, dtype=DTYPE)
    print("SDPA picks:", SDPBackend(torch._fused_sdp_choice(q, k, k, None, 0.0, False, scale=None, enable_gqa=True)).name)
    for backend in ([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION] if GPU else [SDPBackend.MATH]):
        try:
            print(f"{backend.name}: same key length {sdpa_alone(backend, False):.3f} ms/call, "
                  f"new length each call {sdpa_alone(backend, True):.3f} ms/call")
        except RuntimeError as e:  # a backend that refuses these shapes: the decode steps below still run
            print(f"{backend.name}: refused ({str(e).splitlines()[0]})")

    shape = (dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=8192) if GPU else
             dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=256))
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(LlamaConfig(**shape, vocab_size=32000, max_position_embeddings=L + 64))
    model = model.to(DTYPE).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 32000, (1, L), device=DEV)
    with torch.no_grad():
        cache = DynamicCache()
        nxt = model(input_ids=ids, use_cache=True, logits_to_keep=1, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)

        def steps(n):
            nonlocal nxt
            sync()
            t = time.perf_counter()
            for _ in range(n):
                out = model(input_ids=nxt, use_cache=True, logits_to_keep=1, past_key_values=cache)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            return (time.perf_counter() - t) / n * 1e3

        choices = [("default", None)]
        if GPU:
            choices += [("flash only", [SDPBackend.FLASH_ATTENTION]), ("cudnn only", [SDPBackend.CUDNN_ATTENTION]),
                        ("flash, efficient, math", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                    SDPBackend.MATH])]
        for name, backends in choices:
            try:
                with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                    steps(2)
                    print(f"decode step at {L} tokens, {name}: {steps(8):.1f} ms")
            except RuntimeError as e:
                print(f"decode step at {L} tokens, {name}: refused ({str(e).splitlines()[0]})")
        with torch.profiler.profile() as prof:
            steps(1)
    for e in prof.key_averages():
        if "scaled_dot_product" in e.key or e.key == "aten::cat":
            print(f"  one default step: {e.key} x{e.count}, host {e.cpu_time_total / 1e3:.1f} ms")


if __name__ == "__main__":
    main()
