"""Per-axis RoPE designs of the planted heads: channel-pair amplitudes and phases so that a
head's logit is a chosen function of the token offset on each axis (see :mod:`.planted`'s
docstring for the construction: windows by non-negative least squares, sinks by a linear
ramp, global heads by a weak random spectrum).

NNLS is the small projected-gradient solver below rather than ``scipy.optimize.nnls``:
scipy is not a dependency of the package (only of the test and ``haste`` extras), and this
module serves the quality harness and ``scaling-compile bench`` too.
"""

from __future__ import annotations

import functools
import math

import torch

from .head_patterns import AxisSpec, HeadPattern, _axis_relation

ROPE_THETA = 10000.0  # WanRotaryPosEmbed's default theta

# ----------------------------------------------------------------------------------------
# Per-axis RoPE designs
# ----------------------------------------------------------------------------------------


def rope_bands(head_dim: int) -> list[tuple[int, int]]:
    """(offset, width) of the frame / height / width RoPE bands inside one head (WanRotaryPosEmbed)."""
    h = w = 2 * (head_dim // 6)
    t = head_dim - h - w
    return [(0, t), (t, h), (t + h, w)]


def band_freqs(width: int) -> torch.Tensor:
    # Same formula as diffusers' get_1d_rotary_pos_embed (theta=10000), in float64.
    return 1.0 / (ROPE_THETA ** (torch.arange(0, width, 2, dtype=torch.float64) / width))


def nnls(A: torch.Tensor, b: torch.Tensor, max_iter: int = 500) -> torch.Tensor:
    """Non-negative least squares, Lawson-Hanson active set (deterministic, float64, tiny problems)."""
    n = A.shape[1]
    x = torch.zeros(n, dtype=A.dtype)
    passive = torch.zeros(n, dtype=torch.bool)
    grad = A.T @ (b - A @ x)
    for _ in range(max_iter):
        cand = torch.where(~passive, grad, torch.full_like(grad, -math.inf))
        if passive.all() or cand.max() <= 1e-12:
            break
        passive[int(cand.argmax())] = True
        while True:
            z = torch.zeros(n, dtype=A.dtype)
            z[passive] = torch.linalg.lstsq(A[:, passive], b.unsqueeze(1)).solution.squeeze(1)
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = (x[neg] / (x[neg] - z[neg])).min()
            x = x + alpha * (z - x)
            passive &= x > 1e-14
            x[~passive] = 0
        grad = A.T @ (b - A @ x)
    return x


def _axis_logits(f: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) logits f(i - j) on an axis of length n, from f sampled at offsets -(E-1)..E-1 (E >= n)."""
    E = (f.numel() + 1) // 2
    i = torch.arange(n)
    return f[(i[:, None] - i[None, :]) + E - 1]


def _axis_in_mass(f: torch.Tensor, spec: AxisSpec, n: int) -> float:
    """Worst (over query positions) per-axis attention mass inside the spec's relation, axis length n."""
    rel = _axis_relation(spec, n).to(torch.float64)
    return float((_axis_logits(f, n).softmax(-1) * rel).sum(-1).min())


def _axis_in_mass_all_lengths(f: torch.Tensor, spec: AxisSpec, extent: int) -> float:
    """min over axis lengths n <= extent and query positions i < n of the in-relation mass.

    One pass: for a query i the length-n softmax only sums keys j < n, so prefix sums over j
    of exp(f(i - j)) (inside / all) give every n at once.
    """
    logits = _axis_logits(f, extent)
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    rel = _axis_relation(spec, extent).to(torch.float64)
    mass = torch.cumsum(e * rel, -1) / torch.cumsum(e, -1)  # [i, n-1]
    valid = torch.ones(extent, extent, dtype=torch.bool).tril().T  # i <= n-1
    return float(mass[valid].min())


@functools.lru_cache(maxsize=None)
def axis_design(spec: AxisSpec, band_width: int, extent: int, axis_mass: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Pair amplitudes (logit units) and phase offsets for one RoPE band realising ``spec``.

    Guarantees: for every axis length n <= extent and every query coordinate, the per-axis
    attention mass inside the relation is >= axis_mass (checked, raises otherwise).
    """
    freqs = band_freqs(band_width)
    npairs = freqs.numel()
    zeros = (0.0,) * npairs
    kind, size = spec
    if kind == "full" or extent <= 1 or (kind == "window" and size >= extent - 1) or (kind == "sink" and size >= extent):
        return zeros, zeros

    d = torch.arange(extent, dtype=torch.float64)
    keep = freqs * (extent - 1) >= 0.5  # lower frequencies are ~constant over the axis: useless
    lam = 1e-3  # ridge: keeps amplitudes (hence q/k norms, hence rounding error in bf16) small
    if kind == "window":
        # penalty f(0) - f(d) = sum a_k (1 - cos w_k d): bump reaching its plateau at d = r+1
        feats = 1.0 - torch.cos(d[:, None] * freqs[keep])
        target = torch.ones_like(d) if size == 0 else torch.clamp((d / (size + 1)) ** 2, max=1.0)
        target[0] = 0.0
        phase = 0.0
    else:  # sink: logit sum b_k sin(w_k (t_i - t_j)), fitted to a linear ramp in t_i - t_j
        keep &= freqs * (extent - 1) <= math.pi / 2  # monotone over the whole axis
        if not keep.any():
            keep = freqs == freqs.min()
        feats = torch.sin(d[:, None] * freqs[keep])
        target = d.clone()
        phase = -math.pi / 2  # q/k phase offset turning cos into sin
    k = int(keep.sum())
    A = torch.cat([feats, math.sqrt(lam) * torch.eye(k, dtype=torch.float64)])
    b = torch.cat([target, torch.zeros(k, dtype=torch.float64)])
    sol = nnls(A, b)
    amps = torch.zeros(npairs, dtype=torch.float64)
    amps[keep] = sol
    phases = torch.zeros(npairs, dtype=torch.float64)
    phases[keep] = phase
    if not (amps > 0).any():
        raise RuntimeError(f"no RoPE design for {spec} in a band of width {band_width}")

    # Logit profile over all offsets -(extent-1)..extent-1, linear in the amplitudes.
    offs = torch.arange(-(extent - 1), extent, dtype=torch.float64)
    f = torch.cos(offs[:, None] * freqs + phases) @ amps

    # Smallest overall scale reaching the mass target at the largest axis (bisection, geometric).
    lo, hi = 1e-3, 1.0
    while _axis_in_mass(hi * f, spec, extent) < axis_mass:
        hi *= 2.0
        if hi > 1e6:
            raise RuntimeError(f"cannot reach axis mass {axis_mass} for {spec} (band {band_width}, extent {extent})")
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        if _axis_in_mass(mid * f, spec, extent) >= axis_mass:
            hi = mid
        else:
            lo = mid
    amps, f = hi * amps, hi * f
    worst = _axis_in_mass_all_lengths(f, spec, extent)
    if worst < axis_mass - 1e-6:
        raise RuntimeError(f"RoPE design for {spec} misses its target at a smaller axis ({worst:.4f})")
    return tuple(amps.tolist()), tuple(phases.tolist())


def head_spectrum(pattern: HeadPattern, head_dim: int, extent: tuple[int, int, int], axis_mass: float,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair (amplitude, phase offset) over the whole head (D/2 pairs, float64)."""
    amps, phases = [], []
    for spec, (_, width), ext in zip(pattern.axes(), rope_bands(head_dim), extent):
        a, p = axis_design(spec, width, ext, axis_mass)
        amps.append(torch.tensor(a, dtype=torch.float64))
        phases.append(torch.tensor(p, dtype=torch.float64))
    amps, phases = torch.cat(amps), torch.cat(phases)
    if pattern.kind == "global":
        # weak random spectrum: logit range < 2 * 0.2, i.e. near-uniform but not exactly
        w = torch.rand(amps.numel(), generator=gen, dtype=torch.float64)
        amps = 0.2 * w / w.sum()
        phases = (torch.rand(amps.numel(), generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
    return amps, phases
