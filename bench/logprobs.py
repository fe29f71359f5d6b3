"""Peak memory and time of one log-prob pass, full logits against chunked, at a 152k vocabulary.

The model is a small random Qwen2 (2 layers, hidden 256) with Qwen2.5's vocabulary of
151,936 tokens, so the logits dominate as they do for a real small policy. One pass is
`token_logprobs_*` on a (batch x tokens) input, then `.sum().backward()` (or, with
`--no-grad`, the forward alone: what the reference and recomputed log-probs cost).

Every variant runs in a fresh subprocess, so its peak is its own: the peak resident
memory of the pass is `ru_maxrss` after it minus the resident memory before it (torch's
CPU allocator hands large blocks back to the system, so the resident size follows the
live tensors). The bytes saved for the backward (unique storages seen by
`torch.autograd.graph.saved_tensors_hooks`) are printed too: exact, and independent of
the allocator. Time is the best of `--repeats` passes, each variant on `--threads`
threads; the variants run one after the other in the same invocation.

    python bench/logprobs.py [--batch 2] [--tokens 1024] [--hidden 64] [--chunks auto,1024] [--threads 1] [--no-grad]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VOCAB = 151936  # Qwen2.5's


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def run_variant(args) -> dict:
    """One variant, in this (fresh) process: build, measure, report as a JSON line."""
    import gc

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from looprl.train.logprobs import chunked_support, default_chunk_tokens, token_logprobs_chunked, token_logprobs_full

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(2048, args.tokens), tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (args.batch, args.tokens + 1))
    mask = torch.ones_like(ids)
    full = args.variant == "full"
    chunk = None if args.variant in ("full", "auto") else int(args.variant)  # None: the default budget
    if not full and chunked_support(model) is not None:  # the probe runs here, before the baseline
        raise SystemExit(f"chunked path not supported: {chunked_support(model)}")

    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    def one_pass():
        if full:
            lp = token_logprobs_full(model, ids, mask, ids[:, 1:])
        else:
            lp = token_logprobs_chunked(model, ids, mask, ids[:, 1:], chunk_tokens=chunk)
        if not args.no_grad:
            lp.sum().backward()
        return lp

    gc.collect()
    before, peak_before = rss_bytes(), max_rss_bytes()
    times = []
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.set_grad_enabled(not args.no_grad), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            one_pass()
        times.append(time.perf_counter() - start)
    peak_after = max_rss_bytes()
    return {"variant": args.variant if chunk or full else f"{default_chunk_tokens(model)} (default)",
            "peak_bytes": peak_after - before, "under_read": peak_after <= peak_before,
            "saved_bytes": sum(saved.values()), "seconds": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Sized for a shared 2-core machine: under a minute in all and under 5 GB (the full pass
    # peaks near four times its logits). The logits' share grows with the vocabulary over
    # the hidden size, so a small hidden size shows what a real small policy sees.
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="targets per row")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunks", default="auto",
                        help="comma-separated chunk sizes in tokens (auto: the default budget) to compare with the full logits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-grad", action="store_true", help="forward only (reference / recomputed log-probs)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    variants = ["full"] + [c.strip() for c in args.chunks.split(",") if c.strip()]
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("batch", "tokens", "hidden", "layers", "threads", "repeats")]
    passthrough += ["--no-grad"] if args.no_grad else []
    gb = 1024 ** 3
    logits_gb = args.batch * args.tokens * VOCAB * 4 / gb
    print(f"vocabulary {VOCAB}, batch {args.batch} x {args.tokens} tokens, hidden {args.hidden}, "
          f"{args.layers} layers, {args.threads} thread(s), {'forward only' if args.no_grad else 'forward + backward'}; "
          f"full float32 logits alone: {logits_gb:.2f} GiB")
    results = []
    for variant in variants:
        out = subprocess.run([sys.executable, __file__, f"--variant={variant}", *passthrough],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"variant {variant} failed:\n{out.stderr[-2000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = results[0]
    print(f"{'variant':>14} {'peak RSS of the pass':>21} {'ratio':>7} {'saved for backward':>19} {'ratio':>7} "
          f"{'time':>8} {'ratio':>6}")
    for r in results:
        name = "full logits" if r["variant"] == "full" else f"chunk {r['variant']}"
        saved = f"{r['saved_bytes'] / gb:.3f} GiB" if not args.no_grad else "-"
        saved_ratio = f"{full['saved_bytes'] / max(r['saved_bytes'], 1):.1f}x" if not args.no_grad else "-"
        print(f"{name:>14} {r['peak_bytes'] / gb:>17.3f} GiB {full['peak_bytes'] / max(r['peak_bytes'], 1):>6.1f}x "
              f"{saved:>19} {saved_ratio:>7} {r['seconds']:>7.2f}s {r['seconds'] / full['seconds']:>5.2f}x")
        if r["under_read"]:
            print(f"{'':>14} (the process peaked as high before the pass: the pass's peak may be under-read)")


if __name__ == "__main__":
    main()
