"""Survey every video transformer of the installed diffusers: what each attention call sees.

For each family of :mod:`scaling_compile.testing.families` the tiny model runs EAGERLY on CPU
with ``torch.nn.functional.scaled_dot_product_attention`` intercepted (a TorchFunctionMode),
and forward hooks keep the module path of each call. Per call it records the query/key
shapes, the ``attn_mask`` passed and ``is_causal``. The token layout of each call is then
measured, not assumed:

* text rows: the query rows that change when ``encoder_hidden_states`` is perturbed;
* video rows: the query rows that change when the latent is perturbed;
* other rows: the rest (history/reference frames, audio, image tokens, ...);
* order: single latent positions are perturbed, one patch at a time, and the query row that
  moves is compared with the (frames, height, width) raster of the patchified grid.

Rows are read at the first call of each sequence signature (before tokens mix across
blocks); later calls with the same (Sq, Sk) inherit that layout. Attention modules that run
without any SDPA call inside (linear, flex, hand-written attention) are listed as such.

    python benchmarks/survey_families.py            # plain table
    python benchmarks/survey_families.py --markdown # the table of docs/families.md
    python benchmarks/survey_families.py wan ltx    # some families only
    python benchmarks/survey_families.py --backend  # what today's backend does with each family
"""

from __future__ import annotations

import argparse
import sys

from scaling_compile.testing.families import FAMILIES, UNBUILT
from scaling_compile.testing.families.attention import Survey, patch_attributes, survey, video_lengths, video_masks

def _fmt_shape(shape) -> str:
    return "x".join(str(s) for s in shape)


def render(surveys: list[Survey], markdown: bool) -> str:
    lines = []
    if markdown:
        lines.append("| family | class | latent | patch | `_repeated_blocks` | grid -> video tokens, text len | "
                     "call site (count) | q / k (B,H,S,D) | kind | text rows | video rows | other rows | "
                     "order | attn_mask | causal |")
        lines.append("|" + "---|" * 15)
    for sv in surveys:
        fam = sv.family
        head = (fam.name, fam.class_name, fam.latent_layout, patch_attributes(fam),
                ", ".join(fam.repeated_blocks) or "none", f"{sv.grid} -> {sv.video_tokens}, {sv.text_len}")
        if sv.error:
            lines.append(("| " + " | ".join(head) + f" | ERROR: {sv.error} |" + " |" * 8) if markdown
                         else f"{fam.name}: ERROR {sv.error}")
            continue
        if not markdown:
            lines.append(f"== {fam.name} ({fam.class_name}) latent {fam.latent_layout}; {patch_attributes(fam)}; "
                         f"_repeated_blocks={fam.repeated_blocks}; grid {sv.grid} -> {sv.video_tokens} video tokens; "
                         f"text {sv.text_len}; {sv.seq_vs_grid}")
        for i, s in enumerate(sv.sites):
            cells = (f"`{s.pattern}` ({s.count})", f"{_fmt_shape(s.query_shape)} / {_fmt_shape(s.key_shape)}", s.kind,
                     s.text_rows, s.video_rows, s.other_rows, s.order, s.mask, "yes" if s.is_causal else "no")
            if markdown:
                lines.append("| " + " | ".join((head if i == 0 else ("",) * 6) + cells) + " |")
            else:
                lines.append("   " + " | ".join(cells))
        for path, proc in sv.without_sdpa.items():
            text = f"NOT SDPA: `{path}` ran {proc} with no SDPA call"
            lines.append(("| " + " | ".join(("",) * 6) + f" | {text} |" + " |" * 8) if markdown else "   " + text)
        if sv.softmax and not markdown:
            lines.append(f"   softmax outside SDPA: {sv.softmax}")
    if markdown:
        lines.append("")
        lines.append("Not built (video classes of the installed diffusers):")
        lines.append("")
        for name, why in UNBUILT.items():
            lines.append(f"- `{name}`: {why}")
    return "\n".join(lines)


def backend_today(name: str, block: int = 16) -> dict:
    """What today's backend does with this family: its report with no artifact, with hand-written
    masks over the video tokens, and what profiling (WEST, no FAST) gives and serves."""
    import warnings

    import torch

    import scaling_compile as sc

    fam = FAMILIES[name]
    model, inputs = fam.model(), fam.inputs()
    sv = survey(fam, model=model, vary_grid=False)
    video_calls = [c for c in sv.calls if c.serves_video and "per pixel" not in c.kind]
    row = {"family": name, "video self-attention calls": len(video_calls)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._dynamo.reset()
        plain = sc.sdpa_nodes(model, **inputs)
        row["report (no artifact)"] = f"{len(plain)} nodes for {len(sv.calls)} calls; keys " + ", ".join(
            sorted({d.key for d in plain})[:4]) + (" ..." if len({d.key for d in plain}) > 4 else "")
        masks = video_masks(sv, block)
        if masks:
            torch._dynamo.reset()
            topology = sc.Topology.from_block_masks(masks, block_size=block, seq_len=video_lengths(sv))
            hand = sc.sdpa_nodes(model, artifact=topology, **inputs)
            reasons = sorted({d.reason.replace(f"{d.key!r}: ", "")[:90] for d in hand if not d.served and d.key in masks or
                              (not d.served and any(k.endswith("." + d.key) for k in masks))})
            row["hand-written video masks"] = f"{sum(d.served for d in hand)} served" + (
                f"; dense: {'; '.join(reasons)}" if reasons else "")
        else:
            row["hand-written video masks"] = "nothing to serve"
        try:
            torch._dynamo.reset()
            # with the token grid given, as the profiler's error message asks for packed latents
            from scaling_compile.testing.families.attention import patch_sizes

            pt, ph, pw = patch_sizes(fam)
            grid = (-(-fam.default_grid[0] // pt), fam.default_grid[1] // ph, fam.default_grid[2] // pw)
            samples = [sc.CalibrationSample(fam.inputs(seed=s), group=s % 2, grid=grid) for s in range(2)]
            topology = sc.profile(model, samples, block_size=block, sensitivity=False, progress=False)
            torch._dynamo.reset()
            prof = sc.sdpa_nodes(model, artifact=topology, **inputs)
            row["profiled"] = f"{len(topology.keys())} entries, {sum(d.served for d in prof)} served"
        except Exception as exc:  # what a user meets today
            row["profiled"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:140]}"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("families", nargs="*", help="family names (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--backend", action="store_true",
                        help="instead: what today's backend does with each family (report, hand-written "
                             "video masks, profiling); slower (Dynamo captures)")
    args = parser.parse_args(argv)
    names = args.families or list(FAMILIES)
    if args.backend:
        rows = []
        for name in names:
            try:
                rows.append(backend_today(name))
            except Exception as exc:
                rows.append({"family": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"ran {name}", file=sys.stderr, flush=True)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for r in rows:
            print("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
        return 0
    surveys = []
    for name in names:
        fam = FAMILIES[name]
        try:
            surveys.append(survey(fam))
        except Exception as exc:  # report and go on: the survey lists every family
            surveys.append(Survey(fam, fam.default_grid, 0, None, [], {}, {}, "-", f"{type(exc).__name__}: {exc}"))
        print(f"surveyed {name}", file=sys.stderr, flush=True)
    print(render(surveys, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
