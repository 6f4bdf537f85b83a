"""Fast LRSA for training and inference on CUDA: compact K/V layout + one FlexAttention call, no N x N mask."""
from .decode import buffer_attention, slot_mask
from .kernel import (FastOptions, compiled_compact_positions, compiled_flex_attention, fast_lrsa_attention,
                     fast_options, flex_kernel_backend, kernel_report)
from .layout import DEFAULT_BLOCK_SIZE, LrsaLayout, block_classes, buffer_positions, layout_kv, lrsa_block_mask
from .selection import compact_positions

__all__ = [
    "fast_lrsa_attention", "flex_kernel_backend", "kernel_report", "FastOptions", "fast_options",
    "compiled_flex_attention", "LrsaLayout", "DEFAULT_BLOCK_SIZE", "block_classes", "buffer_positions", "layout_kv",
    "lrsa_block_mask", "compact_positions", "compiled_compact_positions", "buffer_attention", "slot_mask",
]
