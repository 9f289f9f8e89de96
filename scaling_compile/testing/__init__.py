"""Test fixtures for scaling-compile: Wan models with planted (known) attention topology."""

from .planted import (
    CONFIGS,
    KINDS,
    SENSITIVITY_SCALES,
    HeadPattern,
    attention_mass_in_mask,
    example_inputs,
    expected_block_mask,
    expected_token_mask,
    plan_from_json,
    plan_to_json,
    planted_head_patterns,
    planted_summary,
    planted_wan_transformer,
    record_self_attention,
    token_grid_of,
)

__all__ = [
    "CONFIGS",
    "HeadPattern",
    "KINDS",
    "SENSITIVITY_SCALES",
    "attention_mass_in_mask",
    "example_inputs",
    "expected_block_mask",
    "expected_token_mask",
    "plan_from_json",
    "plan_to_json",
    "planted_head_patterns",
    "planted_summary",
    "planted_wan_transformer",
    "record_self_attention",
    "token_grid_of",
]
