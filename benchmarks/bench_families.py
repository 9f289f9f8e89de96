"""Forward speedup of non-Wan families at full width (random weights, bf16, one H200 process).

    python benchmarks/bench_families.py --out benchmarks/results/families_h200.json

For each model: HunyuanVideo (13B config: 24 heads x 128, hidden 3072; 720p, 129 frames ->
latent 33 x 90 x 160 -> 118,800 video tokens + 256 text tokens, text key padding on) and
CogVideoX-5B (48 heads x 64; its native 480 x 720, 49 frames -> latent 13 x 60 x 90 -> 17,550
video tokens + 226 text tokens, text prefix):

1. a QUICK PROFILE (``scaling_compile.profile``, WEST + FAST, block 128) of the same model on
   two random calibration inputs at a small latent (HunyuanVideo 9 x 32 x 32, CogVideoX
   5 x 32 x 48: seconds); the topology resamples to the serving grid. Joint attention is
   profiled on its video x video part; the text rows and columns are always kept;
2. dense baseline: the blocks compiled by Inductor (regional: ``compile_repeated_blocks``;
   CogVideoX has no ``_repeated_blocks``, its ``CogVideoXBlock`` is named on the instance), dense SDPA;
3. for each kernel (``triton``, ``gluon``): the blocks compiled by the ``scaling`` backend once,
   the budget switched between 0.3 / 0.2 / 0.1 without recompiling (``AttentionPlan.reconfigure``);
   forward time (median of ``--iters`` CUDA-event timings after a warm-up call), speedup against
   the dense baseline measured in the same process, and the served share of attention nodes.
   HunyuanVideo's joint calls carry a key-padding mask, which the Gluon kernel does not take
   yet: with ``kernel="gluon"`` they run the Triton kernel (the warning is printed and kept in
   the row's ``notes``).

Layers: the full models have 20 + 40 (HunyuanVideo) and 42 (CogVideoX-5B) blocks; a forward of
the full HunyuanVideo at 720p/129f takes tens of seconds dense, so by default this runs
``--hunyuan-layers 2 4`` (dual- + single-stream) and ``--cogvideox-layers 42`` at full width: every
block is identical in size, so the forward ratio of N blocks is the full model's up to its
embeddings and output layers (reported as measured, never extrapolated). About 5 minutes on one
H200 with the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings

import torch


def cuda_ms(fn, iters: int) -> float:
    from scaling_compile.bench import event_times_ms

    fn()  # warm-up (mask instantiation after a budget switch, autotuning)
    return statistics.median(event_times_ms(fn, iters))


# ---------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------
def hunyuan_video(layers):
    from diffusers import HunyuanVideoTransformer3DModel

    dual, single = layers
    model = HunyuanVideoTransformer3DModel(num_layers=dual, num_single_layers=single)  # the 13B config's widths
    text_len, valid = 256, 64

    def inputs(latent, seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.zeros(1, text_len)
        mask[:, :valid] = 1
        return {"hidden_states": torch.randn(1, 16, *latent, generator=g),
                "timestep": torch.tensor([500.0]),
                "encoder_hidden_states": 0.2 * torch.randn(1, text_len, 4096, generator=g),
                "pooled_projections": torch.randn(1, 768, generator=g),
                "encoder_attention_mask": mask,
                "guidance": torch.tensor([6000.0]), "return_dict": False}

    return model, inputs


def cogvideox_5b(layers):
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(num_attention_heads=48, attention_head_dim=64, in_channels=16,
                                        out_channels=16, time_embed_dim=512, text_embed_dim=4096,
                                        num_layers=layers, sample_width=90, sample_height=60, sample_frames=49,
                                        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
                                        use_rotary_positional_embeddings=True)
    model._repeated_blocks = ["CogVideoXBlock"]  # regional compilation of its one block class

    def inputs(latent, seed):
        g = torch.Generator().manual_seed(seed)
        frames, height, width = latent
        return {"hidden_states": torch.randn(1, frames, 16, height, width, generator=g),
                "encoder_hidden_states": 0.2 * torch.randn(1, 226, 4096, generator=g),
                "timestep": torch.tensor([500]), "image_rotary_emb": _cogvideox_rope(frames, height, width),
                "return_dict": False}

    return model, inputs


def _cogvideox_rope(frames, height, width):
    """CogVideoXPipeline's 3-D RoPE for a latent (frames, height, width) of the 5B model."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    grid_h, grid_w = height // 2, width // 2
    crops = get_resize_crop_region_for_grid((grid_h, grid_w), 90 // 2, 60 // 2)
    cos, sin = get_3d_rotary_pos_embed(embed_dim=64, crops_coords=crops, grid_size=(grid_h, grid_w),
                                       temporal_size=frames)
    return cos, sin


MODELS = {
    "hunyuan_video": dict(build=hunyuan_video, latent=(33, 90, 160), profile_latent=(9, 32, 32),
                          label="HunyuanVideo 720p 129f"),
    "cogvideox_5b": dict(build=cogvideox_5b, latent=(13, 60, 90), profile_latent=(5, 32, 48),
                         label="CogVideoX-5B 480x720 49f"),
}


def to_device(inputs, device="cuda"):
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            cast = value.is_floating_point() and key not in ("timestep", "encoder_attention_mask")
            out[key] = value.to(torch.bfloat16) if cast else value
        elif isinstance(value, tuple):
            out[key] = tuple(v.to(device) for v in value)
        else:
            out[key] = value
    return out


def uncompile(model):
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


# ---------------------------------------------------------------------------------------------
def bench(name, args) -> dict:
    import scaling_compile as sc
    from scaling_compile.kernels.block_mask import BlockMask

    spec = MODELS[name]
    layers = tuple(args.hunyuan_layers) if name == "hunyuan_video" else args.cogvideox_layers
    with torch.device("cuda"):  # random weights drawn on the GPU (seconds, not minutes of CPU init)
        model, make_inputs = spec["build"](layers)
    model = model.to("cuda", torch.bfloat16).eval()
    print(f"{spec['label']}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters "
          f"(layers {layers}), {torch.cuda.get_device_name()}", flush=True)

    started = time.perf_counter()
    calibration = [sc.CalibrationSample(to_device(make_inputs(spec["profile_latent"], seed)), group=seed,
                                        progress=0.3 + 0.4 * seed) for seed in (0, 1)]
    topology = sc.profile(model, calibration, sc.ProfileConfig(block_size=128, progress=False))
    profile_s = time.perf_counter() - started
    print(f"  profiled {len(topology.keys())} nodes at latent {spec['profile_latent']} in {profile_s:.1f} s; "
          f"layouts: {next(iter(topology.metadata['west']['layouts'].values()))}", flush=True)
    del calibration

    inputs = to_device(make_inputs(spec["latent"], 7))
    rows = []
    with torch.no_grad():
        torch._dynamo.reset()
        model.compile_repeated_blocks(backend="inductor", fullgraph=False)
        started = time.perf_counter()
        model(**inputs)
        torch.cuda.synchronize()
        dense_compile_s = time.perf_counter() - started
        dense_ms = cuda_ms(lambda: model(**inputs), args.iters)
        print(f"  inductor dense: forward {dense_ms:.1f} ms (compile {dense_compile_s:.1f} s)", flush=True)
        rows.append({"kernel": "inductor", "budget": None, "forward_ms": dense_ms, "speedup": 1.0})
        made = sc.CompiledPlans()
        for kernel in args.kernels:
            torch._dynamo.reset()
            uncompile(model)
            made.release_masks()  # the previous kernel's graphs are gone: free their device masks
            made = sc.CompiledPlans()
            sc.compile_repeated_blocks(model, options={"artifact": topology, "kernel": kernel, "plans": made})
            started = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:  # e.g. gluon passing key-padded calls to triton
                warnings.simplefilter("always")
                model(**inputs)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - started
            notes = sorted({str(w.message)[:200] for w in caught if "scaling" in str(w.message)
                            or "sparse_attention" in str(w.message)})
            for note in notes:
                print(f"  {kernel}: {note}", flush=True)
            plans = made.plans()
            for budget in args.budgets:
                for plan in plans:
                    plan.reconfigure(budget=budget)
                forward_ms = cuda_ms(lambda: model(**inputs), args.iters)
                masks = {k[0]: m for p in plans for k, m in p._cache.items() if isinstance(m, BlockMask)}
                density = statistics.mean(float(m.density) for m in masks.values()) if masks else math.nan
                row = {"kernel": kernel, "budget": budget, "forward_ms": forward_ms, "speedup": dense_ms / forward_ms,
                       "served_nodes": len(masks), "nodes": len(topology.keys()), "mean_call_density": density,
                       "compile_s": compile_s, "notes": notes}
                rows.append(row)
                print(f"  {kernel:7s} budget {budget:.2f}: forward {forward_ms:8.1f} ms, speedup "
                      f"{row['speedup']:.2f}x, served {len(masks)}/{len(topology.keys())} nodes, "
                      f"call density {density:.3f}", flush=True)
        uncompile(model)
    return {"model": spec["label"], "latent": spec["latent"], "layers": layers, "profile_latent": spec["profile_latent"],
            "profile_s": profile_s, "dense_compile_s": dense_compile_s, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.2, 0.1])
    parser.add_argument("--kernels", nargs="+", default=["triton", "gluon"])
    parser.add_argument("--hunyuan-layers", type=int, nargs=2, default=[2, 4], metavar=("DUAL", "SINGLE"))
    parser.add_argument("--cogvideox-layers", type=int, default=42)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "models": []}
    for name in args.models:
        results["models"].append(bench(name, args))
        torch.cuda.empty_cache()
    print("\n| model | kernel | budget | forward ms | speedup vs Inductor dense |")
    print("|---|---|---|---|---|")
    for result in results["models"]:
        for row in result["rows"]:
            budget = "dense" if row["budget"] is None else f"{row['budget']:.1f}"
            print(f"| {result['model']} | {row['kernel']} | {budget} | {row['forward_ms']:.1f} | {row['speedup']:.2f}x |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
