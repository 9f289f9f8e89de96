"""Host time of one call of ``torch.ops.scaling.sparse_sdpa``: its Python path, measured on tiny tensors.

The op's work per call on the host (dispatch, finding the call's plan and module, the cached
mask lookup, choosing the kernel) is paid by every served attention call of every step;
on a GPU it is hidden only while the device is busier than the host. This measures it on
CPU with tensors so small that the attention itself is negligible, and splits it:

* ``op``: ``torch.ops.scaling.sparse_sdpa`` as the compiled graph calls it (with an anchor,
  so the module is found and confirmed as in serving);
* ``masks_for``: the plan's part (module place, layout, cached mask);
* ``attention``: ``kernels.attention.sparse_attention`` on the cached mask alone;
* ``sdpa``: PyTorch's dense SDPA on the same tensors (the floor of any attention call);
* ``python_calls_per_op``: Python function calls per op call (cProfile), a count that does not
  depend on the machine's load.

    python benchmarks/op_host_time.py [--calls 2000] [--device cpu|cuda] [--profile]
    python benchmarks/op_host_time.py --device cuda --dtype float16 --seq 1024 --head-dim 64 --block 128

On CUDA the figures are host time per call too (the device work is queued, not waited for,
except once at the end of each timing).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import scaling_compile as sc
from scaling_compile import op as _op  # noqa: F401  (registers torch.ops.scaling.sparse_sdpa)
from scaling_compile.kernels.attention import sparse_attention
from scaling_compile.plans import AttentionPlan, plan_handle


class Attention(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q = torch.nn.Linear(dim, dim)


class Root(torch.nn.Module):
    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"attn1": Attention(dim)}) for _ in range(layers))


def setup(device: str, heads: int = 1, seq: int = 64, head_dim: int = 8, block: int = 16, dtype=torch.float32):
    """A root model, a plan for its ``blocks.*.attn1`` (hand-written masks) and its handle (what the
    op is passed), and one call's tensors."""
    torch.manual_seed(0)
    root = Root(heads * head_dim, layers=2).to(device)
    n = -(-seq // block)
    masks = {f"blocks.{i}.attn1": torch.rand(heads, n, n) < 0.5 for i in range(2)}
    for mask in masks.values():
        mask |= torch.eye(n, dtype=torch.bool)
    topology = sc.Topology.from_block_masks(masks, block, seq_len=seq)
    plan = AttentionPlan("attn1", "to_q.weight", topology, kernel="auto")
    handle = plan_handle(plan, device)
    q, k, v = (torch.randn(1, heads, seq, head_dim, device=device, dtype=dtype) for _ in range(3))
    anchor = root.blocks[1]["attn1"].to_q.weight
    return root, plan, handle, (q, k, v), anchor


def per_call_us(fn, calls: int, repeats: int = 7, device: str = "cpu") -> float:
    """Least over ``repeats`` of the mean CPU time of this process over ``calls`` calls, in
    microseconds: CPU time, not wall time, and the least, because on a shared machine other
    processes only ever add to it (on CUDA: wall time, the device being waited for once)."""
    clock = time.perf_counter if device == "cuda" else time.process_time
    fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        began = clock()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((clock() - began) / calls * 1e6)
    return min(samples)


def python_calls(fn, calls: int) -> float:
    """Python-level function calls (cProfile's count) per call of ``fn``: deterministic, unlike time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    return pstats.Stats(profiler).total_calls / calls


def gluon_launch_us(q, k, v, mask, args) -> dict:
    """On Hopper, the Gluon kernel called directly on the mask's lists (no routing), with the host TMA
    descriptors it launches with by default and with descriptors made in the kernel (DESC_MODE 1: no
    host encoding, a little device work): how much of ``attention_us`` the launch itself is."""
    from scaling_compile.kernels import gluon_block_sparse as gbs
    from scaling_compile.kernels.attention import _kernel_operands

    if gbs.gluon_unsupported_reason(q.device, q.dtype, q.shape[-1], args.block) is not None:
        return {}
    _words, _index, lists = _kernel_operands(mask, None, None, device_lists=False)
    if lists is None:
        return {}
    in_kernel = gbs.DEFAULT_CONFIGS[q.shape[-1]][:-1] + (1,)
    results = {}
    for name, config in (("gluon_launch_us", None), ("gluon_in_kernel_descriptors_us", in_kernel)):
        try:
            results[name] = per_call_us(lambda: gbs.gluon_block_sparse_attention(q, k, v, lists, args.block,
                                                                               config=config),
                                        args.calls, device=args.device)
        except Exception as error:  # noqa: BLE001 - a variant that does not run here is reported, not fatal
            print(f"{name}: not measured ({type(error).__name__}: {str(error)[:200]})")
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="also print the op's top functions (cProfile)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=8, help="8 (default) runs the chunked path; 16-128 the kernel")
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: threads only add noise to host time
    root, plan, handle, (q, k, v), anchor = setup(args.device, args.heads, args.seq, args.head_dim, args.block,
                                                   getattr(torch, args.dtype))
    mask = plan.masks_for(q, anchor)
    assert isinstance(mask, sc.kernels.block_mask.BlockMask), mask  # served, not dense

    def op():
        return torch.ops.scaling.sparse_sdpa(q, k, v, anchor, handle, None, None, None)

    with torch.no_grad():
        results = {
            "op_us": per_call_us(op, args.calls, device=args.device),
            "masks_for_us": per_call_us(lambda: plan.masks_for(q, anchor), args.calls, device=args.device),
            "attention_us": per_call_us(lambda: sparse_attention(q, k, v, mask), args.calls, device=args.device),
            "sdpa_us": per_call_us(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), args.calls,
                                   device=args.device),
        }
        results["op_overhead_us"] = results["op_us"] - results["attention_us"]
        results.update(gluon_launch_us(q, k, v, mask, args))
        results["python_calls_per_op"] = python_calls(op, 100)
        for name, value in results.items():
            print(f"{name:>20}: {value:8.1f}" + ("" if name.startswith("python") else " us"))
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                op()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    del root
    return results


if __name__ == "__main__":
    main()
