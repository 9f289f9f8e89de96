"""End-to-end Wan2.1 transformer forward: the scaling backend against Inductor with dense SDPA.

Run on the GPU machine (one process, every number a ratio against a baseline of
the same process)::

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_wan_e2e.py --config wan2.1-1.3b \
        --frames 21 --height 60 --width 104 --modes regional --budgets 0.5 0.3 0.2 0.1 \
        --out $OUT/e2e.json

For each compilation mode (``regional``: ``compile_repeated_blocks(fullgraph=True)``;
``whole``: ``torch.compile(transformer, fullgraph=True)``) it compiles the dense
baseline (Inductor, cuDNN SDPA) and the scaling backend at each budget, with 3D-local
masks of exactly that density for every block and head (static masks of the
sliding-tile family; speed depends on density, not on which blocks are kept),
and reports compile time (first call), forward time (median of timed calls),
speedup, and the share of the Amdahl bound reached: bound = dense time minus
(1 - density) x the dense self-attention time, the latter measured in the same
process as 30 (num_layers) cuDNN SDPA calls on the self-attention shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build_model(config: str, dtype, device):
    try:
        from scaling_compile.testing import planted_wan_transformer

        return planted_wan_transformer(config, dtype=dtype, device=device).eval()
    except Exception as error:  # planted construction unavailable: random weights, same architecture
        print(f"planted model unavailable ({error}); using random weights")
        from diffusers import WanTransformer3DModel

        configs = {
            "wan2.1-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
            "wan2.1-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
        }
        with torch.device(device):
            model = WanTransformer3DModel(
                patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, **configs[config],
            )
        return model.to(dtype).eval()


def time_forward(fn, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def first_call_seconds(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="wan2.1-1.3b")
    parser.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames -> 21)")
    parser.add_argument("--height", type=int, default=60, help="latent height (480p -> 60)")
    parser.add_argument("--width", type=int, default=104, help="latent width (832 -> 104)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3, 0.2, 0.1])
    parser.add_argument("--modes", nargs="+", default=["regional"], choices=["regional", "whole"])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import scaling_compile as sc
    from scaling_compile.masks import local_3d_mask

    torch.manual_seed(0)
    device, dtype = "cuda", torch.bfloat16
    model = build_model(args.config, dtype, device)
    cfg = model.config
    heads, layers = cfg.num_attention_heads, cfg.num_layers
    grid = (args.frames, args.height // 2, args.width // 2)
    seq = grid[0] * grid[1] * grid[2]
    inputs = dict(
        hidden_states=torch.randn(1, cfg.in_channels, args.frames, args.height, args.width, device=device, dtype=dtype),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, 512, cfg.text_dim, device=device, dtype=dtype),
        return_dict=False,
    )
    print(f"{args.config}: {layers} layers x {heads} heads, grid {grid} = {seq} tokens, bf16, {torch.cuda.get_device_name()}")

    # dense self-attention time in this process (the Amdahl accounting)
    q = torch.randn(1, heads, seq, cfg.attention_head_dim, device=device, dtype=dtype)
    attention_ms = time_forward(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), iters=10) * layers
    del q

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config,
               "grid": grid, "seq": seq, "dense_self_attention_ms": attention_ms, "rows": []}
    for mode in args.modes:
        for budget in [None] + list(args.budgets):
            torch._dynamo.reset()
            if budget is None:
                backend, options = "inductor", None
            else:
                masks = local_3d_mask(grid, args.block_size, budget, heads, temporal_weights=(0.5, 1.0, 2.0, 4.0))
                topology = sc.Topology.from_block_masks(
                    {f"blocks.{i}.attn1": masks for i in range(layers)}, block_size=args.block_size
                )
                backend, options = "scaling", {"artifact": topology, "strict": True}
            kwargs = {"backend": backend, "fullgraph": True}
            if options:
                kwargs["options"] = options
            if mode == "regional":
                for block in model.blocks:  # undo the previous run's regional compile
                    block._compiled_call_impl = None
                model.compile_repeated_blocks(**kwargs)
                run = model
            else:
                run = torch.compile(model, **kwargs)
            with torch.no_grad():
                compile_s = first_call_seconds(lambda: run(**inputs))
                forward_ms = time_forward(lambda: run(**inputs), iters=args.iters)
            row = {"mode": mode, "budget": budget, "compile_s": compile_s, "forward_ms": forward_ms}
            results["rows"].append(row)
            print(f"{mode:9s} budget {budget if budget else 'dense':>5}: compile {compile_s:6.1f} s, forward {forward_ms:7.1f} ms", flush=True)
        for block in model.blocks:
            block._compiled_call_impl = None

    print("\n| mode | budget | compile s | forward ms | speedup | Amdahl bound ms | share of bound |")
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes:
        rows = [r for r in results["rows"] if r["mode"] == mode]
        dense = rows[0]
        for row in rows:
            density = 1.0 if row["budget"] is None else row["budget"]
            bound = dense["forward_ms"] - (1 - density) * attention_ms
            row["speedup"] = dense["forward_ms"] / row["forward_ms"]
            row["bound_ms"] = bound
            row["share_of_bound"] = bound / row["forward_ms"] if row["budget"] else None  # speedup / bound speedup
            share = "" if row["share_of_bound"] is None else f"{100 * row['share_of_bound']:.0f}%"
            print(f"| {mode} | {row['budget'] or 'dense'} | {row['compile_s']:.1f} | {row['forward_ms']:.1f} | "
                  f"{row['speedup']:.2f}x | {bound:.1f} | {share} |")
    print(f"dense self-attention (cuDNN SDPA x {layers}): {attention_ms:.1f} ms")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
