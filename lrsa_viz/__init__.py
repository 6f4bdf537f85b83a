"""lrsa-viz: learn, see and use Lag-Relative Sparse Attention (LRSA) and LagKV KV-cache compression."""
from .agreement import SelectionAgreement, compare_selections
from .attention import (SUPPORTED_MODEL_TYPES, disable_lrsa, enable_lrsa, lrsa, lrsa_attention_forward, lrsa_backend_of,
                        lrsa_config_of)
from .cache import LagKVCache, LagKVLayer, compress_once
from .config import LagConfig
from .mask import lrsa_visibility, partition_index, visibility_from_keep
from .models import cast_model, load_model, tiny_model
from .policies import POLICIES, LagKVPolicy, Policy, RandomPolicy, SnapKVPolicy, StreamingPolicy, make_policy
from .profile import environment_record, run_profile
from .prefill import chunked_prefill, compressed_generate, prefill_chunks
from .scoring import keep_mask, lagkv_keep_indices, lagkv_scores
from .static_cache import StaticLagKVCache, cache_capacity, stored_length
from .static_generate import (disable_static_lagkv, enable_static_lagkv, greedy_decode, static_generate, static_lagkv,
                              static_prefill)

__all__ = [
    "LagConfig", "lagkv_scores", "lagkv_keep_indices", "keep_mask", "lrsa_visibility", "visibility_from_keep",
    "partition_index", "enable_lrsa", "disable_lrsa", "lrsa", "lrsa_config_of", "lrsa_attention_forward",
    "SUPPORTED_MODEL_TYPES", "LagKVCache", "LagKVLayer", "chunked_prefill", "compressed_generate", "prefill_chunks", "load_model", "cast_model",
    "tiny_model", "compress_once", "Policy", "LagKVPolicy", "RandomPolicy", "SnapKVPolicy", "StreamingPolicy", "POLICIES",
    "make_policy", "run_profile", "environment_record", "lrsa_backend_of", "compare_selections", "SelectionAgreement",
    "StaticLagKVCache", "cache_capacity", "stored_length", "enable_static_lagkv", "disable_static_lagkv",
    "static_lagkv", "static_prefill", "static_generate", "greedy_decode",
]
