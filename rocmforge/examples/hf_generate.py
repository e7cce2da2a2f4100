"""Hugging Face generate() with rocmforge's KV cache beside transformers' DynamicCache.

    python -m rocmforge.examples.hf_generate [--arch llama] [--batch 8] [--prompt-len 128]
        [--shared-prefix 96] [--new 64] [--layers 4] [--hidden 256] [--dtype auto] [--vary]
        [--attention auto|gather|paged]

Builds a small model from a config (random weights; nothing is downloaded) on
the GPU when there is one, generates greedily for a batch of prompts of
--prompt-len tokens (--vary: of different lengths, left-padded) whose first
--shared-prefix tokens are the same, with each cache, and prints tokens per
second (medians of --reps runs, the caches alternating, after a warm-up), the
KV bytes in use at the end of a generation (DynamicCache: its tensors;
rocmforge: its used blocks, whose shared prefix blocks count once) and whether
the outputs are identical; then one JSON line. Whether DynamicCache gives the
same outputs in each of its own runs is reported too: on a GPU, at batch 32
with 1k-token prompts, its greedy tokens part from run to run after about 130
new tokens (near-ties in bfloat16), and then so do any two caches'. The exit
status is 1 only when DynamicCache repeats itself and rocmforge differs from
it. Needs torch and transformers (pip install 'rocmforge[transformers]')."""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--shared-prefix", type=int, default=96)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--vary", action="store_true", help="left-pad rows to different prompt lengths")
    parser.add_argument("--attention", choices=["auto", "gather", "paged"], default="auto",
                        help="rocmforge's attention: auto is paged on a GPU, gather elsewhere")
    args = parser.parse_args(argv)
    if not 0 <= args.shared_prefix < args.prompt_len:
        parser.error("--shared-prefix must be in [0, --prompt-len)")
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rocmforge.integrations.transformers import RocmforgeCache, cache_kwarg

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if device == "cuda"
                                                                     else torch.float32)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        args.arch]
    torch.manual_seed(0)
    heads = max(4, args.hidden // 64)
    cfg = config_cls(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                     num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads // 4 or 1,
                     max_position_embeddings=args.prompt_len + args.new + 16, pad_token_id=0)
    model = model_cls(cfg).eval().to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(1, 1024, (args.shared_prefix,), generator=g)
    ids = torch.cat([shared.expand(args.batch, -1),
                     torch.randint(1, 1024, (args.batch, args.prompt_len - args.shared_prefix), generator=g)], 1)
    if args.vary:                            # left padding: row i is shorter by (7 i) mod (prompt - shared)
        for i in range(1, args.batch):
            pad = (i * 7) % (args.prompt_len - args.shared_prefix)
            ids[i] = torch.cat([torch.zeros(pad, dtype=torch.long), ids[i, :args.prompt_len - pad]])
    mask = (ids != 0).long()
    ids, mask = ids.to(device), mask.to(device)
    tokens_per_row = args.prompt_len + args.new
    blocks = args.batch * -(-tokens_per_row // args.block_size) + 16

    def run(cache):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                                 do_sample=False, pad_token_id=0, **cache_kwarg(model, cache))
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    names = ("DynamicCache", "rocmforge")
    times, outs, kv_bytes, theirs = {n: [] for n in names}, {}, {}, []
    with RocmforgeCache(model, num_blocks=blocks, block_size=args.block_size, attention=args.attention) as ours:
        for rep in range(args.reps + 1):             # the first is a warm-up; the caches alternate
            for name in names:
                cache = DynamicCache(config=model.config) if name == "DynamicCache" else ours
                outs[name], seconds = run(cache)
                if rep:
                    times[name].append(seconds)
                if name == "DynamicCache":
                    theirs.append(outs[name])
                    kv_bytes[name] = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
                else:
                    kv_bytes[name] = ours.kv.manager.num_used_blocks * ours.kv.config.bytes_per_block
                    ours.reset()
        path = ours.attention_path
    results = {n: {"tokens_per_s": args.batch * args.new / statistics.median(times[n]), "kv_bytes": kv_bytes[n],
                   "out": outs[n]} for n in names}
    same = bool(torch.equal(results["DynamicCache"]["out"], results["rocmforge"]["out"]))
    reproducible = all(torch.equal(out, theirs[0]) for out in theirs)
    print(f"{args.arch} {args.layers} layers, hidden {args.hidden}, {dtype} on {device}; batch {args.batch}, "
          f"prompts up to {args.prompt_len} tokens ({args.shared_prefix} shared), {args.new} new; attention: {path}")
    print(f"{'cache':<14} {'tokens/s':>10} {'KV MiB':>9}")
    for name in ("DynamicCache", "rocmforge"):
        r = results[name]
        print(f"{name:<14} {r['tokens_per_s']:10.1f} {r['kv_bytes'] / 2**20:9.2f}")
    print(f"outputs identical: {same}; DynamicCache's own outputs the same in every run: {reproducible}")
    print(json.dumps({"device": device, "dtype": str(dtype).split(".")[-1], "arch": args.arch, "batch": args.batch,
                      "prompt_len": args.prompt_len, "shared_prefix": args.shared_prefix, "new": args.new,
                      "attention_path": path, "identical": same, "dynamic_reproducible": reproducible,
                      **{f"{k}_{m}": results[k][m] for k in results for m in ("tokens_per_s", "kv_bytes")}}))
    return 0 if same or not reproducible else 1


if __name__ == "__main__":
    raise SystemExit(main())
