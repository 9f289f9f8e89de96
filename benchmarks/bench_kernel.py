"""Block-sparse attention kernel vs cuDNN/flash SDPA (dense) and FlexAttention, on identical masks.

Run on a CUDA GPU, from the repo root (no install needed: the script
loads this checkout's ``kernels/`` as ``scaling_compile.kernels``)::

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_kernel.py --out out/bench_kernel.json

For each shape (default Wan2.1-1.3B 480p and 720p and Wan2.1-14B 720p
self-attention, (1, 12, 32760, 128), (1, 12, 75600, 128), (1, 40, 75600, 128),
bf16), each mask kind (the package's own families, ``scaling_compile.masks``:
``random``: every query block keeps round(density * n) random key blocks, its own
among them; ``local``: every query block keeps its nearest key blocks on the
latent (frames x height x width) grid, heads alternating temporal / isotropic /
spatial; ``local_uneven``: the same with per-head densities from 0.25x to 1.75x,
so query blocks differ in work) and each density, it times with
``triton.testing.do_bench`` (median, L2 flushed) in ONE process:

* cuDNN SDPA and flash SDPA, dense (density 1.0 only; their time is the dense
  baseline for every density);
* FlexAttention (default Triton backend, compiled), with a BlockMask built from
  the same bool mask at 128x128 (kept blocks passed as full blocks);
* FlashAttention-4 (where ``flash-attn-4`` is installed): ``fa4`` = its block-sparse
  forward on the same kept-block lists (this package's ``kernel="fa4"`` back-end,
  ``kernels/fa4_block_sparse.py``), ``fa4_dense`` = its dense forward (density 1.0);
* this kernel: ``default`` = the public call (lists of kept blocks built on
  device from the packed mask at every call + the autotuned kernel);
  ``lists_tma1`` / ``lists_tma2`` / ``lists_ptr`` = cached lists
  (``kv_block_lists``) with host 4-D TMA descriptors / in-kernel 2-D TMA
  descriptors / plain pointers; ``bits`` = the kernel tests the mask bits itself;
  ``gluon`` = the warp-specialised Gluon Hopper kernel (``kernels/gluon_block_sparse.py``)
  on the same cached lists, one CTA per query block; ``gluon_persistent`` = the same
  kernel on its persistent schedule (one CTA per SM, work list built once per mask);
  ``gluon_pingpong`` / ``gluon_persistent_pingpong`` = the two consumer warpgroups
  taking turns issuing their matmuls (FA3's ping-pong);
  ``gluon:C-S-PW-PR-CR-M`` = an explicit launch config.

The default variants are ``lists_tma1,gluon,gluon_persistent``; the table at the end
has a row per density and, per peer, the faster Gluon schedule's speed-up (same
process). The one-session GPU script ``benchmarks/gpu_gluon_check.sh`` runs it at the
three shapes after the Gluon tests.

``--sweep "MODE:BM,BN,WARPS,STAGES[:ws];..."`` instead times explicit launch
configurations (cached lists, TMA mode MODE, optional warp specialization) at
one shape on random masks, checking each against the reference on slices.

``--key-padding`` instead measures what key padding (``key_valid``) costs the
kernel: joint video + text attention at (1, 24, 32760 + 256, 128) bf16 (Wan 480p
grid 21 x 30 x 52, then 256 text tokens whose last 156 are padding), masks built
with the package's own 3D-local family (``scaling_compile.masks.local_3d_mask``)
on the video blocks, text rows and columns kept; it times the Triton kernel's
public call and the Gluon kernel (on sm90) with cached lists, with and without
``key_valid`` (and FA4 without padding, where installed, and masked dense SDPA),
checking each against the reference::

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_kernel.py --key-padding --out out/bench_key_padding.json

Checks: every sparse output is compared with the fp32 reference on slices of
query blocks (first two and last two, the ragged one included) and with our
kernel's output (max abs error over the whole tensor), so a peer that ignores
the mask (e.g. a dense backend chosen behind its back) shows up. Effective TFLOP/s =
4 * B * H * S^2 * D * density / time, density = fraction of kept blocks.
Prints a table per shape and mask kind; writes every number to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
import types
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_kernels():
    """This checkout's kernels as ``scaling_compile.kernels`` (installed or not)."""
    try:
        return importlib.import_module("scaling_compile.kernels.block_sparse_attention")
    except ImportError:
        if "scaling_compile" not in sys.modules:
            parent = types.ModuleType("scaling_compile")
            parent.__path__ = [str(ROOT / "scaling_compile")]
            sys.modules["scaling_compile"] = parent
        sub = types.ModuleType("scaling_compile.kernels")
        sub.__path__ = [str(ROOT / "kernels")]
        sys.modules["scaling_compile.kernels"] = sub
        return importlib.import_module("scaling_compile.kernels.block_sparse_attention")


bsa = _import_kernels()
fa4 = importlib.import_module("scaling_compile.kernels.fa4_block_sparse")
bitpack = importlib.import_module("scaling_compile.kernels.bitpack")
reference = importlib.import_module("scaling_compile.kernels.reference")
gluon_bsa = importlib.import_module("scaling_compile.kernels.gluon_block_sparse")
masks_pkg = importlib.import_module("scaling_compile.masks")  # the package's own mask families

# latent grids (frames, height, width) of Wan2.1 after VAE + 2x2 patchify, 81 frames
GRIDS = {32760: (21, 30, 52), 75600: (21, 45, 80)}
# Wan2.1-1.3B 480p and 720p, Wan2.1-14B 720p (81 frames) self-attention
DEFAULT_SHAPES = "1,12,32760,128;1,12,75600,128;1,40,75600,128"


# --------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------


def random_mask(h, n, density, seed, device):
    """The package's random family: each query block keeps exactly round(density * n) key blocks, its own
    among them (``scaling_compile.masks.random_block_mask``)."""
    return masks_pkg.random_block_mask(n, density, heads=h, seed=seed).to(device)


LOCAL_TEMPORAL_WEIGHTS = (0.25, 1.0, 4.0)  # per head, cycled: temporal-ish, isotropic, spatial-ish heads


def local_mask(h, s, block, density, device, uneven=False):
    """The package's 3D-local family on the latent grid of ``s`` tokens: each query block keeps its nearest
    round(density * n) key blocks (``scaling_compile.masks.local_3d_mask``), heads alternating between
    temporal and spatial neighbourhoods. ``uneven``: per-head densities spread from 0.25x to 1.75x the
    given one (as per-head budgets make them; mean about ``density``), so query blocks differ in work."""
    grid = GRIDS.get(s)
    if grid is None:
        raise SystemExit(f"local masks need S in {sorted(GRIDS)} (a Wan2.1 latent grid), got S={s}")
    if not uneven:
        return masks_pkg.local_3d_mask(grid, block, density, heads=h,
                                       temporal_weights=LOCAL_TEMPORAL_WEIGHTS).to(device)
    factors = torch.linspace(0.25, 1.75, h).tolist() if h > 1 else [1.0]
    heads = [masks_pkg.local_3d_mask(grid, block, min(1.0, density * f), heads=1,
                                     temporal_weights=(LOCAL_TEMPORAL_WEIGHTS[i % 3],))
             for i, f in enumerate(factors)]
    return torch.cat(heads).to(device)


def build_mask(kind, h, s, block, density, device):
    n = math.ceil(s / block)
    if density >= 1.0:
        return torch.ones(h, n, n, dtype=torch.bool, device=device)
    if kind == "random":
        return random_mask(h, n, density, int(density * 1000) + s, device)
    if kind in ("local", "local_uneven"):
        return local_mask(h, s, block, density, device, uneven=kind == "local_uneven")
    raise SystemExit(f"unknown mask kind {kind!r}: random, local or local_uneven")


# --------------------------------------------------------------------------------------
# peers
# --------------------------------------------------------------------------------------


def sdpa_dense(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return run


_FLEX = None


def flex_runner():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def flex_block_mask(counts, indices, s, block):
    """BlockMask with exactly our kept blocks, all as 'full' blocks (no mask_mod work)."""
    from torch.nn.attention.flex_attention import BlockMask

    counts, indices = counts[None].contiguous(), indices[None].contiguous()
    return BlockMask.from_kv_blocks(
        torch.zeros_like(counts), torch.zeros_like(indices), counts, indices,
        BLOCK_SIZE=block, seq_lengths=(s, s), compute_q_blocks=False,
    )


def reference_slices(q, k, v, mask, block):
    """fp32 reference rows of the first two and the last two query blocks: [(row0, row1, out)]."""
    s = q.shape[2]
    n = mask.shape[-1]
    out = []
    for qb0, qb1 in ((0, min(2, n)), (max(0, n - 2), n)):
        r0, r1 = qb0 * block, min(qb1 * block, s)
        ref = reference.block_sparse_attention_reference(q[:, :, r0:r1], k, v, mask[:, qb0:qb1], block)
        out.append((r0, r1, ref))
    return out


def err_vs_slices(out, slices):
    return max((out[:, :, r0:r1].float() - ref.float()).abs().max().item() for r0, r1, ref in slices)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def time_in_rounds(runners: dict, first: dict, rounds: int, bench) -> dict:
    """name -> its ``rounds`` times: ``first[name]``, then ``rounds - 1`` more, every runner in turn
    within a round (A B C, A B C, ...), so that a drifting clock (a power-capped GPU) weighs on each alike."""
    samples = {name: [first[name]] for name in runners}
    for _ in range(rounds - 1):
        for name, fn in runners.items():
            samples[name].append(bench(fn))
    return samples


def parse_shape(text):
    b, h, s, d = (int(x) for x in text.split(","))
    return b, h, s, d


def kernel_info(compiled):
    """Registers / spills / shared memory and whether wgmma and TMA made it into the PTX."""
    try:
        ptx = compiled.asm.get("ptx", "")
        return {
            "n_regs": getattr(compiled, "n_regs", None),
            "n_spills": getattr(compiled, "n_spills", None),
            "shared": compiled.metadata.shared,
            "num_warps": compiled.metadata.num_warps,
            "num_stages": compiled.metadata.num_stages,
            "wgmma": "wgmma" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx,
        }
    except Exception as exc:  # informational only
        return {"error": repr(exc)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="B,H,S,D;...")
    p.add_argument("--densities", default="1.0,0.5,0.3,0.2,0.1")
    p.add_argument("--masks", default="random,local")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--variants", default="lists_tma1,gluon,gluon_persistent",
                   help="our kernels' variants to time (default, lists_tma1, lists_tma2, lists_ptr, bits, gluon, "
                        "gluon_persistent, gluon[:CONFIG])")
    p.add_argument("--sweep", default=None, help="MODE:BM,BN,WARPS,STAGES[:ws];... explicit configs to time")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--no-fa4", action="store_true", help="skip FlashAttention-4 even where it is installed")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every kernel of a cell this many times, in turn (A B C, A B C, ...), and report the "
                        "median over rounds: drift of a power-capped GPU then falls on every kernel alike")
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds; stop starting new shapes/masks after it")
    p.add_argument("--out", default="bench_kernel.json")
    p.add_argument("--key-padding", action="store_true",
                   help="time key_valid vs none on joint video+text masks (default shape 1,24,33016,128)")
    p.add_argument("--text-tokens", type=int, default=256, help="--key-padding: text tokens after the video")
    p.add_argument("--text-valid", type=int, default=100, help="--key-padding: valid (unpadded) text tokens")
    args = p.parse_args(argv)

    import triton
    from triton.testing import do_bench
    from torch.nn.attention import SDPBackend

    assert torch.cuda.is_available(), "benchmark needs a CUDA GPU"
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    block = args.block_size
    densities = [float(x) for x in args.densities.split(",")]
    t_start = time.time()
    env = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "block_size": block,
        "dtype": args.dtype,
    }
    print(json.dumps(env))
    results, tuning = [], {}
    if args.sweep:
        return sweep(args, env, dtype, block, densities, do_bench)
    if args.key_padding:
        return key_padding(args, env, dtype, block, do_bench)

    def bench(fn):
        return do_bench(fn, warmup=25, rep=args.rep, return_mode="median")

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"env": env, "results": results, "tuning": tuning}, indent=1))

    for shape_text in args.shapes.split(";"):
        b, h, s, d = parse_shape(shape_text)
        flops_dense = 4.0 * b * h * s * s * d
        gen = torch.Generator(dev).manual_seed(0)
        x = torch.randn(3, b, s, h, d, generator=gen, device=dev, dtype=dtype)
        q, k, v = (t.transpose(1, 2) for t in x)  # (B, H, S, D) views of (B, S, H, D), as in a DiT
        n = math.ceil(s / block)
        row = dict(shape=[b, h, s, d])

        # dense baselines
        dense = {}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                fn = sdpa_dense(backend)
                out = fn(q, k, v)
                ms = bench(lambda: fn(q, k, v))
                dense[name] = (ms, out)
                results.append(dict(row, mask="dense", density=1.0, kernel=f"sdpa_{name}", ms=ms,
                                    tflops=flops_dense / ms * 1e-9))
                print(f"S={s} sdpa_{name}: {ms:.3f} ms {flops_dense / ms * 1e-9:.0f} TFLOP/s", flush=True)
            except Exception as exc:
                print(f"S={s} sdpa_{name} failed: {exc!r}", flush=True)
        base_name = "cudnn" if "cudnn" in dense else ("flash" if "flash" in dense else None)
        base_ms = dense[base_name][0] if base_name else float("nan")

        for mask_kind in args.masks.split(","):
            if time.time() - t_start > args.time_budget:
                print(f"time budget reached: skipping S={s} {mask_kind}", flush=True)
                continue
            for density in densities:
                if density >= 1.0 and mask_kind != args.masks.split(",")[0]:
                    continue  # the dense mask is the same for every kind
                mask = build_mask(mask_kind, h, s, block, density, dev)
                actual = mask.float().mean().item()
                words = bitpack.pack_block_mask(mask)
                lists = bsa.kv_block_lists(words, n)
                flops = flops_dense * actual
                slices = reference_slices(q, k, v, mask, block)
                cell = dict(row, mask=mask_kind if density < 1.0 else "dense", density=density,
                            actual_density=actual)
                timings, outs, runners = {}, {}, {}

                # our kernel, variants
                for variant in args.variants.split(","):
                    use_lists = variant.startswith("lists")
                    use_tma = {"lists_tma1": 1, "lists_tma2": 2, "lists_ptr": 0}.get(variant)  # else default mode
                    try:
                        out = bsa.empty_output_like(q)
                        bl = lists if use_lists else None
                        if variant == "default":
                            def run_ours():
                                return bsa.block_sparse_attention(q, k, v, words, block)

                            out = run_ours()
                            compiled = None
                        elif variant.startswith("gluon"):
                            # "gluon[_persistent][_pingpong]", optionally ":CONSUMERS-STAGES-PW-PREGS-CREGS-MODE"
                            config = tuple(int(x) for x in variant.split(":")[1].split("-")) if ":" in variant else None
                            persistent = "persistent" in variant.split(":")[0]
                            pingpong = "pingpong" in variant.split(":")[0]
                            work = gluon_bsa.gluon_work_list(lists[0], b) if persistent else None  # once per mask

                            def run_ours(out=out, config=config, persistent=persistent, pingpong=pingpong, work=work):
                                return gluon_bsa.gluon_block_sparse_attention(
                                    q, k, v, lists, block, out=out, config=config, persistent=persistent,
                                    pingpong=pingpong, work_list=work)

                            run_ours()
                            compiled = None
                        else:
                            def run_ours(out=out, bl=bl, use_tma=use_tma):
                                return bsa._launch(q, k, v, out, words, block, None, None, bl, use_tma=use_tma)

                            compiled = run_ours()
                        torch.cuda.synchronize()
                        key = f"S={s},{variant}"
                        if key not in tuning and compiled is not None:
                            tuner = bsa._block_sparse_attn_fwd_tuned
                            tuning[key] = {
                                "best": str(getattr(tuner, "best_config", None)),
                                "timings": {str(c): t for c, t in getattr(tuner, "configs_timings", {}).items()}
                                if getattr(tuner, "configs_timings", None) else {},
                                "kernel": kernel_info(compiled),
                            }
                            print(f"  tuned {key}: {json.dumps(tuning[key])}", flush=True)
                        ms = bench(run_ours)
                        runners[f"ours_{variant}"] = run_ours
                        err_ref = err_vs_slices(out, slices)
                        timings[f"ours_{variant}"] = ms
                        outs[f"ours_{variant}"] = out
                        results.append(dict(cell, kernel=f"ours_{variant}", ms=ms, tflops=flops / ms * 1e-9,
                                            err_vs_ref=err_ref))
                    except Exception as exc:
                        traceback.print_exc()
                        results.append(dict(cell, kernel=f"ours_{variant}", error=repr(exc)))
                ours_key = next((key for key in outs), None)

                # FlexAttention with the same blocks
                if not args.no_flex:
                    try:
                        flex = flex_runner()
                        bm = flex_block_mask(*lists, s, block)
                        out = flex(q, k, v, block_mask=bm)
                        runners["flex"] = run_flex = lambda: flex(q, k, v, block_mask=bm)
                        ms = bench(run_flex)
                        timings["flex"] = ms
                        outs["flex"] = out
                        results.append(dict(cell, kernel="flex", ms=ms, tflops=flops / ms * 1e-9,
                                            err_vs_ref=err_vs_slices(out, slices)))
                    except Exception as exc:
                        traceback.print_exc()
                        results.append(dict(cell, kernel="flex", error=repr(exc)))

                # FlashAttention-4: block-sparse on the same lists (and dense at density 1.0)
                if not args.no_fa4 and fa4.fa4_installed():
                    try:
                        fa4_lists = fa4.fa4_block_lists(*lists, block)
                        runs = {"fa4": lambda: fa4.fa4_block_sparse_attention(q, k, v, fa4_lists)}
                        if density >= 1.0:
                            runs["fa4_dense"] = lambda: fa4.fa4_dense_attention(q, k, v)
                        for name, fn in runs.items():
                            out = fn()
                            ms = bench(fn)
                            runners[name] = fn
                            timings[name] = ms
                            outs[name] = out
                            results.append(dict(cell, kernel=name, ms=ms, tflops=flops / ms * 1e-9,
                                                err_vs_ref=err_vs_slices(out, slices)))
                    except Exception as exc:
                        traceback.print_exc()
                        results.append(dict(cell, kernel="fa4", error=repr(exc)[:500]))

                cell_rows = [r for r in results if r.get("density") == density and r.get("mask") == cell["mask"]
                             and r["shape"] == row["shape"]]  # this cell's rows, every kernel
                if args.rounds > 1:  # more rounds, every kernel in turn; the median over rounds replaces each time
                    rounds = time_in_rounds(runners, timings, args.rounds, bench)
                    for r in cell_rows:
                        if r["kernel"] in rounds:
                            timings[r["kernel"]] = r["ms"] = statistics.median(rounds[r["kernel"]])
                            r["tflops"] = flops / r["ms"] * 1e-9
                            r["ms_rounds"] = rounds[r["kernel"]]

                # cross-checks against our output
                if ours_key:
                    ref_out = outs[ours_key]
                    for r in cell_rows:
                        if "ms" in r and r["kernel"] in outs:
                            r["err_vs_ours"] = (outs[r["kernel"]].float() - ref_out.float()).abs().max().item()
                    if density >= 1.0:
                        for name, (ms, out) in dense.items():
                            for r in results:
                                if r["kernel"] == f"sdpa_{name}" and r["shape"] == row["shape"]:
                                    r["err_vs_ours"] = (out.float() - ref_out.float()).abs().max().item()
                for r in cell_rows:
                    if "ms" in r:
                        if "flex" in timings:
                            r["speedup_vs_flex"] = timings["flex"] / r["ms"]
                        if "fa4" in timings:
                            r["speedup_vs_fa4"] = timings["fa4"] / r["ms"]
                        r["speedup_vs_dense_" + str(base_name)] = base_ms / r["ms"]
                        print(
                            f"S={s} {cell['mask']:>6} d={density:.2f} ({actual:.3f}) {r['kernel']:>15}: "
                            f"{r['ms']:8.3f} ms {r['tflops']:6.0f} TFLOP/s  x{r.get('speedup_vs_flex', float('nan')):.2f} flex"
                            f"  x{r.get('speedup_vs_fa4', float('nan')):.2f} fa4"
                            f"  x{r['speedup_vs_dense_' + str(base_name)]:.2f} {base_name}"
                            f"  err_ref={r.get('err_vs_ref', float('nan')):.4f} err_ours={r.get('err_vs_ours', float('nan')):.4f}",
                            flush=True,
                        )
                del outs
                save()
        del q, k, v, x, dense
        torch.cuda.empty_cache()

    save()
    print_table(results, densities)


def sweep(args, env, dtype, block, densities, do_bench):
    """Time explicit launch configs (cached lists) at the first shape, random masks; print as we go."""
    b, h, s, d = parse_shape(args.shapes.split(";")[0])
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, b, s, h, d, generator=gen).to(dtype).to(dev)
    q, k, v = (t.transpose(1, 2) for t in x)
    n = math.ceil(s / block)
    cases = []
    for density in densities:
        mask = build_mask("random", h, s, block, density, dev)
        words = bitpack.pack_block_mask(mask)
        cases.append((density, mask.float().mean().item(), words, bsa.kv_block_lists(words, n),
                      reference_slices(q, k, v, mask, block)))
    rows = []
    for spec in args.sweep.split(";"):
        parts = spec.split(":")
        mode, cfg, ws = int(parts[0]), tuple(int(x) for x in parts[1].split(",")), parts[2:] == ["ws"]
        for density, actual, words, lists, slices in cases:
            row = dict(spec=spec, shape=[b, h, s, d], density=density)
            try:
                out = bsa.empty_output_like(q)

                def run(out=out, words=words, lists=lists):
                    return bsa._launch(q, k, v, out, words, block, None, None, lists, use_tma=mode, config=cfg,
                                       warp_specialize=ws)

                compiled = run()
                torch.cuda.synchronize()
                ms = do_bench(run, warmup=25, rep=args.rep, return_mode="median")
                flops = 4.0 * b * h * s * s * d * actual
                row.update(ms=ms, tflops=flops / ms * 1e-9, err_vs_ref=err_vs_slices(out, slices),
                           kernel=kernel_info(compiled))
                print(f"SWEEP {spec:>24} d={density:.2f} {ms:8.3f} ms {row['tflops']:6.0f} TFLOP/s "
                      f"err_ref={row['err_vs_ref']:.4f} {json.dumps(row['kernel'])}", flush=True)
            except Exception as exc:
                row["error"] = repr(exc)[:500]
                print(f"SWEEP {spec:>24} d={density:.2f} FAILED {row['error'][:300]}", flush=True)
                rows.append(row)
                break
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "sweep": rows}, indent=1))


def joint_local_mask(heads, grid, text_tokens, block, density):
    """Bool (heads, n, n) for [video (t-major grid), text]: 3D-local on the video blocks (the package's
    own family), every row and column touching a text token kept (text attends and is attended by all)."""
    masks = importlib.import_module("scaling_compile.masks")
    video = grid[0] * grid[1] * grid[2]
    n = math.ceil((video + text_tokens) / block)
    local = masks.local_3d_mask(grid, block, density, heads=heads, temporal_weights=(0.25, 1.0, 4.0))
    mask = torch.zeros(heads, n, n, dtype=torch.bool)
    mask[:, : local.shape[1], : local.shape[2]] = local
    first_text_block = video // block
    mask[:, first_text_block:, :] = True
    mask[:, :, first_text_block:] = True
    return mask


def key_padding(args, env, dtype, block, do_bench, device="cuda"):
    """Cost of key padding in the kernel: key_valid vs none, same masks, one process."""
    shapes = args.shapes if args.shapes != DEFAULT_SHAPES else f"1,24,{32760 + args.text_tokens},128"
    b, h, s, d = parse_shape(shapes.split(";")[0])
    video = s - args.text_tokens
    grid = GRIDS.get(video)
    assert grid is not None, f"--key-padding needs S = video + text with video in {sorted(GRIDS)}, got S={s}"
    dev = torch.device(device)
    densities = [float(x) for x in args.densities.split(",") if float(x) < 1.0] or [0.3]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, b, s, h, d, generator=gen).to(dtype).to(dev)
    q, k, v = (t.transpose(1, 2) for t in x)
    key_valid = torch.ones(b, s, dtype=torch.bool, device=dev)
    key_valid[:, video + args.text_valid:] = False  # the text's padded tail
    env = dict(env, mode="key_padding", shape=[b, h, s, d], grid=list(grid), text_tokens=args.text_tokens,
               text_valid=args.text_valid)
    rows = []

    def bench(fn):
        return do_bench(fn, warmup=25, rep=args.rep, return_mode="median")

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"env": env, "results": rows}, indent=1))

    try:  # dense with the padding mask, for context (SDPA picks a backend that takes a bool mask)
        padded = key_valid[:, None, None, :]
        ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=padded))
        record(dict(kernel="sdpa_dense_key_valid", density=1.0, ms=ms))
    except Exception as exc:
        record(dict(kernel="sdpa_dense_key_valid", error=repr(exc)[:300]))
    for density in densities:
        mask = joint_local_mask(h, grid, args.text_tokens, block, density).to(dev)
        actual = mask.float().mean().item()
        words = bitpack.pack_block_mask(mask)
        n = mask.shape[-1]
        lists = bsa.compact_block_lists(*bsa.kv_block_lists(words, n))
        flops = 4.0 * b * h * s * s * d * actual
        timings = {}
        runs = [("triton_none", None, "triton"), ("triton_key_valid", key_valid, "triton")]
        if "gluon" in args.variants.split(",") and gluon_bsa.gluon_unsupported_reason(q.device, q.dtype, d, block) is None:
            runs += [("gluon_none", None, "gluon"), ("gluon_key_valid", key_valid, "gluon")]
        for name, kv, kernel in runs:
            def run(kv=kv, kernel=kernel):
                if kernel == "gluon":
                    return gluon_bsa.gluon_block_sparse_attention(q, k, v, lists, block, key_valid=kv)
                return bsa.block_sparse_attention(q, k, v, words, block, block_lists=lists, key_valid=kv)

            try:
                out = run()
            except Exception as exc:  # the Gluon kernel on a machine where it fails: the rest still runs
                record(dict(kernel=name, density=density, error=repr(exc)[:300]))
                continue
            if dev.type == "cuda":
                torch.cuda.synchronize()
            slices = [(r0, r1, reference.block_sparse_attention_reference(
                q[:, :, r0:r1], k, v, mask[:, r0 // block: math.ceil(r1 / block)], block, key_valid=kv))
                for r0, r1 in ((0, 2 * block), ((n - 3) * block, s))]
            ms = bench(run)
            timings[name] = ms
            record(dict(kernel=name, density=density, actual_density=actual, ms=ms, tflops=flops / ms * 1e-9,
                        err_vs_ref=err_vs_slices(out, slices)))
        if not args.no_fa4 and fa4.fa4_installed():
            try:
                fa4_lists = fa4.fa4_block_lists(*lists, block)
                ms = bench(lambda: fa4.fa4_block_sparse_attention(q, k, v, fa4_lists))
                record(dict(kernel="fa4_none", density=density, actual_density=actual, ms=ms,
                            tflops=flops / ms * 1e-9))
            except Exception as exc:
                record(dict(kernel="fa4_none", density=density, error=repr(exc)[:300]))
        for kernel in ("triton", "gluon"):
            if f"{kernel}_none" in timings and f"{kernel}_key_valid" in timings:
                overhead = timings[f"{kernel}_key_valid"] / timings[f"{kernel}_none"]
                record(dict(kernel=f"{kernel}_key_valid_over_none", density=density, ratio=overhead))
                print(f"KEYPAD S={s} local d={density:.2f} ({actual:.3f}) {kernel}: none "
                      f"{timings[f'{kernel}_none']:.3f} ms, key_valid {timings[f'{kernel}_key_valid']:.3f} ms: "
                      f"x{overhead:.3f}", flush=True)
        if "gluon_key_valid" in timings:
            speedup = timings["triton_key_valid"] / timings["gluon_key_valid"]
            print(f"KEYPAD S={s} local d={density:.2f}: with key_valid, Gluon x{speedup:.2f} vs Triton", flush=True)


# table columns: (result kernel name, column title); the ratios compare the Gluon kernel with each peer
TABLE_COLUMNS = (("sdpa_cudnn", "cuDNN dense"), ("fa4_dense", "FA4 dense"), ("fa4", "FA4 block-sparse"),
                 ("flex", "Flex"), ("ours_lists_tma1", "Triton"), ("ours_default", "Triton (public call)"),
                 ("ours_gluon", "Gluon"), ("ours_gluon_persistent", "Gluon persistent"),
                 ("ours_gluon_pingpong", "Gluon ping-pong"), ("ours_gluon_persistent_pingpong", "Gluon pers. ping-pong"))
GLUON_SCHEDULES = ("ours_gluon", "ours_gluon_persistent", "ours_gluon_pingpong", "ours_gluon_persistent_pingpong")
RATIO_PEERS = (("fa4", "FA4"), ("sdpa_cudnn", "dense cuDNN"), ("ours_lists_tma1", "Triton"), ("flex", "Flex"))


def print_table(results, densities):
    """Markdown, one table per (shape, mask kind): a row per density, 'ms (TFLOP/s)' per kernel, then the
    fastest Gluon schedule's speed-up over each peer (peer ms / Gluon ms, same process; over dense cuDNN:
    cuDNN's dense time / Gluon's sparse time) and the persistent schedule's over the plain one."""
    shapes = []
    for r in results:
        if tuple(r["shape"]) not in shapes:
            shapes.append(tuple(r["shape"]))
    for shape in shapes:
        rows = [r for r in results if tuple(r["shape"]) == shape and "ms" in r]
        kinds = []
        for r in rows:
            if r["mask"] != "dense" and r["mask"] not in kinds:
                kinds.append(r["mask"])
        present = {r["kernel"] for r in rows}
        columns = [(key, title) for key, title in TABLE_COLUMNS if key in present]
        peers = [(key, title) for key, title in RATIO_PEERS if key in present]
        for kind in kinds or ["dense"]:
            print(f"\n### {shape} bf16, {kind} masks: ms (effective TFLOP/s); ratios: the fastest Gluon schedule")
            head = [title for _, title in columns] + [f"Gluon x vs {t}" for _, t in peers] + ["persistent x vs plain"]
            print("| density | " + " | ".join(head) + " |")
            print("|---|" + "---|" * len(head))
            dense_cudnn = next((r for r in rows if r["kernel"] == "sdpa_cudnn"), None)
            for d in densities:
                def find(key):
                    for r in rows:
                        if r["kernel"] != key or abs(r["density"] - d) > 1e-9:
                            continue
                        if r["mask"] == kind or r["mask"] == "dense" or key == "sdpa_cudnn":
                            return r
                    return None
                cells = []
                for key, _ in columns:
                    r = find(key) if (key not in ("sdpa_cudnn", "fa4_dense") or d >= 1.0) else None
                    cells.append(f"{r['ms']:.2f} ({r['tflops']:.0f})" if r else "")
                gluon = [r for r in map(find, GLUON_SCHEDULES) if r]
                best = min((r["ms"] for r in gluon), default=None)
                for key, _ in peers:
                    peer = dense_cudnn if key == "sdpa_cudnn" else find(key)  # cuDNN: dense attention's time
                    cells.append(f"{peer['ms'] / best:.2f}" if peer and best else "")
                plain, pers = find("ours_gluon"), find("ours_gluon_persistent")
                cells.append(f"{plain['ms'] / pers['ms']:.2f}" if plain and pers else "")
                if any(cells):
                    print(f"| {'dense' if d >= 1.0 else f'{d:g}'} | " + " | ".join(cells) + " |")
    worst = max((r.get("err_vs_ref", 0.0) for r in results if "ms" in r), default=float("nan"))
    errors = [f"{r['kernel']} {r['shape']} {r['mask']} {r['density']}: {r['error'][:200]}" for r in results
              if "error" in r]
    print(f"\nlargest error against the fp32 reference (first and last two query blocks): {worst:.2e}")
    for line in errors:
        print("FAILED", line)


if __name__ == "__main__":
    main()
