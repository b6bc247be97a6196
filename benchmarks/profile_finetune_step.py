"""Where a fine-tuning step's time goes (GPU): host time per phase, GPU busy time, and the top operators.

    PYTHONPATH=src python benchmarks/profile_finetune_step.py [--model PATH] [--steps 40] [--out DIR]

For each (plan, batch size): the same SST-2 batches as `sparseattn finetune` (length-bucketed, padded per
batch) are run through (1) collate + host-to-device copy, (2) + forward, (3) + backward, (4) + clipping and
the optimizer step, each phase timed over --steps steps with one synchronization at the end. If a phase's
wall time is far above its GPU busy time (from the profiler), the host (Python, dispatch) is the limit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--configs", default="dense:32,dense:128,later-half: neighbour(2):128")
    ap.add_argument("--out", default=None, help="folder for the profiler tables")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke run of the script")
    ap.add_argument("--limit", type=int, default=None, help="examples to tokenize (smoke runs)")
    args = ap.parse_args(argv)
    import torch.nn.functional as F
    import transformers
    from torch.profiler import ProfilerActivity, profile

    from sparseattn import sparsify
    from sparseattn.training.batching import collate, encode_split, to_device, train_batches
    from sparseattn.training.glue import load_split
    from sparseattn.models import load_model, load_tokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tok = load_tokenizer(args.model)
    examples = load_split("sst2", "train", args.glue_dir)[: args.limit]
    split = encode_split(tok, examples, 128)
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'plan':<26} {'batch':>5} {'collate+h2d':>11} {'+forward':>9} {'+backward':>9} {'+optimizer':>10} "
          f"{'GPU busy':>8}  ms/step")
    for cfg in args.configs.split(","):
        plan, bs = cfg.rsplit(":", 1)
        bs = int(bs)
        torch.manual_seed(0)
        model = load_model(args.model, task="classification", num_labels=2, dtype=torch.float32)
        if plan != "dense":
            sparsify(model, plan, tokenizer=tok)
        model.to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        batches = train_batches(split, bs, np.random.default_rng(0))[: args.steps + 10]

        def run(phase, idxs, model=model, opt=opt):  # bound now: the loop deletes both at its end
            for idx in idxs:
                b = to_device(collate(split, idx, pad_to_multiple_of=8, pin=cuda), dev)
                if phase == 0:
                    continue
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                   token_type_ids=b["token_type_ids"]).logits
                loss = F.cross_entropy(logits.float(), b["labels"])
                if phase == 1:
                    continue
                loss.backward()
                if phase == 3:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                opt.zero_grad(set_to_none=True)

        run(3, batches[:10])  # warm-up
        times = []
        for phase in range(4):
            sync()
            t0 = time.perf_counter()
            run(phase, batches[10:])
            sync()
            times.append(1000 * (time.perf_counter() - t0) / args.steps)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            run(3, batches[10:])
            sync()
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events if e.self_device_time_total > 0)
        busy = gpu_us / 1000 / args.steps
        print(f"{plan:<26} {bs:>5} " + " ".join(f"{t:>{w}.2f}" for t, w in zip(times, (11, 9, 9, 10)))
              + f" {busy:>8.2f}")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            name = f"{'dense' if plan == 'dense' else 'neighbour'}_{bs}"
            with open(os.path.join(args.out, f"prof_{name}.txt"), "w") as f:
                f.write(events.table(sort_by="self_cpu_time_total", row_limit=30))
                f.write("\n\n")
                f.write(events.table(sort_by="self_device_time_total", row_limit=20))
        del model, opt
    print("\nms/step columns are cumulative phases (wall, synchronized once per phase); GPU busy = sum of kernel "
          "times per step. wall >> GPU busy: the host is the limit.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
