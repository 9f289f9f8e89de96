"""Quantized Wan2.1-14B transformer forward: sparse attention vs the same quantized model dense (CUDA GPU).

The Wan2.1-14B config (40 layers x 40 heads x 128, random weights, bf16), its Linear weights
quantized with torchao (float8 or int8 weight-only, ``torchao.quantization.quantize_``), compiled
regionally (``compile_repeated_blocks``): Inductor with dense SDPA against the ``scaling`` backend
with 3D-local block masks at each budget, one process, median of ``--iters`` forwards after the
first (compiling) call. About 3.5 minutes on one H200 at 720p with the defaults (float8, 2026-12-01: a dense
forward took 11.3 s there)::

    pip install "torchao==<the build for your torch>"   # see docs/stacks.md
    PYTHONUNBUFFERED=1 python3 benchmarks/bench_quantized.py --quant float8 --latent 21 90 160 \\
        --budgets 0.3 0.2 --out out/quantized-float8.json

The speed-up is the ratio of the dense row's forward time to each sparse row's.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quant", choices=["float8", "int8", "none"], default="float8",
                        help="torchao weight-only quantization of every Linear")
    parser.add_argument("--latent", type=int, nargs=3, default=[21, 90, 160], metavar=("F", "H", "W"),
                        help="latent frames, height, width (21 90 160 = 81 frames at 720p)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.2])
    parser.add_argument("--kernel", choices=["auto", "triton", "fa4", "gluon"], default="auto")
    parser.add_argument("--layers", type=int, default=40, help="transformer blocks (40: the 14B model)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def wan14b(layers: int):
    """The Wan2.1-T2V-14B transformer config with random weights, built in bf16 on the GPU."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def quantize(model, how: str):
    if how == "none":
        return model
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    quantize_(model, Float8WeightOnlyConfig() if how == "float8" else Int8WeightOnlyConfig())
    return model


def cuda_ms(fn, iters: int) -> float:
    """Median CUDA-event time of ``fn`` in ms (the first, compiling call is the warm-up)."""
    from scaling_compile.bench import event_times_ms

    times = sorted(event_times_ms(fn, iters))
    return times[len(times) // 2]


def main(argv=None) -> int:
    import scaling_compile as sc
    from scaling_compile.masks import local_3d_mask

    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_quantized measures speed on a CUDA GPU; none is available here")
    started = time.perf_counter()
    model = quantize(wan14b(args.layers), args.quant)
    grid = (args.latent[0], args.latent[1] // 2, args.latent[2] // 2)
    seq = math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, *args.latent, device="cuda", dtype=torch.bfloat16, generator=g),
        timestep=torch.tensor([500], device="cuda"),
        encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g),
    )
    weight = model.blocks[0].attn1.to_q.weight
    print(f"Wan2.1-14B config, {args.layers} layers, {args.quant} weights ({type(weight).__name__}), grid {grid} = "
          f"{seq} tokens, {torch.cuda.get_device_name()}, torch {torch.__version__}; built in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "quant": args.quant,
               "weight_type": type(weight).__name__, "grid": grid, "seq": seq, "layers": args.layers, "rows": []}
    try:
        import torchao

        results["torchao"] = torchao.__version__
    except ImportError:
        pass
    runs = [None, *args.budgets]
    for budget in runs:
        torch._dynamo.reset()
        for block in model.blocks:
            block._compiled_call_impl = None
        if budget is None:
            model.compile_repeated_blocks(backend="inductor")
        else:
            masks = local_3d_mask(grid, args.block_size, budget, 40, temporal_weights=(0.5, 1.0, 2.0, 4.0))
            topology = sc.Topology.from_block_masks({f"blocks.{i}.attn1": masks for i in range(args.layers)},
                                                    block_size=args.block_size, seq_len=seq)
            model.compile_repeated_blocks(backend="scaling", options={
                "artifact": topology, "strict": True, "kernel": args.kernel})
        with torch.no_grad():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**inputs)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            forward_ms = cuda_ms(lambda: model(**inputs), args.iters)
        row = {"budget": budget, "compile_s": compile_s, "forward_ms": forward_ms}
        if budget is not None:
            row["speedup"] = results["rows"][0]["forward_ms"] / forward_ms
        results["rows"].append(row)
        label = "dense (Inductor)" if budget is None else f"sparse budget {budget}"
        extra = f", {row['speedup']:.2f}x" if budget is not None else ""
        print(f"{args.quant:6s} {label:18s}: first call {compile_s:6.1f} s, forward {forward_ms:8.1f} ms{extra}",
              flush=True)
    results["total_s"] = time.perf_counter() - started
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
