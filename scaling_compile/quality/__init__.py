"""Quality harness: what a mask policy keeps of dense attention, and what it costs the video.

Metrics (all against dense attention, same inputs, same seed)
--------------------------------------------------------------
* per node (every ``blocks.i.attn1`` call of the dense model on recorded inputs):
  **attention recall**, the dense attention mass inside the served block mask,
  averaged over queries and heads (:func:`block_attention_mass` works in chunks of
  query rows, never the S x S matrix; recall of any mask is then a dot product,
  ``west.mass_recall``); **attention-output relative L2** of the sparse output of that
  node, given the very same q, k, v (:func:`sparse_attention`: the op's own path);
  on a planted model also the **planted block recall**, the share of the
  ground-truth blocks (``testing.expected_block_mask``) the mask keeps;
* transformer output: relative L2 and cosine of the sparse model's output on the
  same recorded inputs;
* end to end: a full denoising loop through diffusers' ``WanPipeline`` (prompt
  embeddings given, no text encoder; a small seeded random ``AutoencoderKLWan``),
  sparse against dense from the same seed: **PSNR** (over the whole clip) and
  **SSIM** (:func:`ssim`, Gaussian window, per frame, mean) of the decoded frames.

Policies (``scaling_compile.baselines``) are served the way they would be used: the
topologies through ``torch.compile(model, backend="scaling", options={"artifact": ...,
"budget": ...})`` (``strict``: nothing silently dense), the online oracle eagerly from
each call's own q and k (:func:`serve_baseline`).

Modules: :mod:`.metrics` (the numbers), :mod:`.interception` (reaching and serving the
self-attention calls), :mod:`.pipeline` (the denoising loop and VAE), :mod:`.harness`
(``run_harness(HarnessConfig(...))`` does it all and returns the results), :mod:`.report`
(targets, table, plot, files);
``benchmarks/quality_harness.py`` is the command (table, JSON, PNG; speed on a GPU).
"""

from __future__ import annotations

from .harness import PRESETS, HarnessConfig, measure_speed, run_harness
from .interception import self_attention_calls, serve_baseline, sparse_attention
from .metrics import attention_recall, block_attention_mass, block_recall, cosine, psnr, relative_l2, ssim
from .pipeline import decode_latents, generate, tiny_vae, wan_pipeline
from .report import check_targets, format_table, format_targets, plot_results, report, write_outputs

__all__ = [
    "HarnessConfig",
    "PRESETS",
    "attention_recall",
    "block_attention_mass",
    "block_recall",
    "check_targets",
    "cosine",
    "decode_latents",
    "format_table",
    "format_targets",
    "report",
    "generate",
    "measure_speed",
    "plot_results",
    "psnr",
    "relative_l2",
    "run_harness",
    "self_attention_calls",
    "serve_baseline",
    "sparse_attention",
    "ssim",
    "tiny_vae",
    "wan_pipeline",
    "write_outputs",
]
