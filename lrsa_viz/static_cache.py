"""`StaticLagKVCache`: the LagKV cache of `lrsa_viz.cache` with fixed-size buffers, for compiled decoding.

Same tokens as `LagKVCache` (recursive mode, LagKV policy), stored differently. One preallocated buffer per
K, V and original position, shared by all layers::

    keys, values: [layers, B, H_kv, M, d]      positions: [layers, B, H_kv, M] (int32)
    slot:  0 ...... S ......................... F ..................... stored ..... M
           [ sink  | selections, k per partition | tail: L <= t < 2L tokens | free        ]

M (`cache_capacity`) is METHOD eq. 12 for ``max_cache_len`` tokens plus the room a step needs before it compresses
("use then compress": the token that completes a partition is attended to before the partition behind it is cut).
Two counters live on the device, so that a decode step reads nothing back to the host and its tensor shapes never
change (what torch.compile and CUDA graphs need):

    seen  tokens appended so far (the next token's RoPE position: positions are ORIGINAL positions, METHOD §4)
    done  partitions compressed so far;  stored = seen - done * (L - k) = eq. 12 of ``seen``

Each update, in layer 0, first compresses what the previous update left due, for every layer at once and with
fixed shapes: the window [F, F + 2L) is scored (`lrsa_viz.scoring.token_std_scores`, then THE selection function
`lrsa_viz.scoring.select_top_k`), the k survivors are written at F, the reference partition moves down behind them
and its old slots are recycled. When nothing is due the same kernels run and write the window back unchanged
(``torch.where`` on the device flag): no branch on device data. Then each layer writes its new tokens at ``stored``.
The attention mask needs no positions: stored tokens sit in slots ``0 .. stored - 1`` and new ones right after, so
``slot <= stored + i`` is the whole rule (`get_query_offset` returns ``stored`` for the mask builders).

The first update of an empty cache (the prompt) is compressed at once, one-shot (`lrsa_viz.scoring`): after N
tokens that is exactly the state of the recursive cache (sink + selections + last full partition + remainder),
and it lets the prompt go through one parallel LRSA forward (`lrsa_viz.static_generate`). Each layer selects once:
the cache hands the prompt's key tensor a `PromptFill` (`lrsa_viz.attention.attach_prompt_fill`), the flex LRSA
attention selects inside its compiled region and stores what it kept; any other attention leaves the fill to the
cache's own selection (`PromptFill.finish`), before the next update or read at the latest.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import attach_prompt_fill, detach_prompt_fill
from .checks import check_int
from .config import LagConfig
from .scoring import check_kv, lagkv_keep_indices, select_top_k, token_std_scores

#: Buffer lengths are rounded up to a multiple of this (aligned rows for the attention kernels' masks).
DEFAULT_PAD_TO = 16


def stored_length(seen: int | torch.Tensor, config: LagConfig) -> int | torch.Tensor:
    """Tokens a recursive LagKV cache stores after ``seen`` tokens: METHOD eq. 12 (``seen`` below S + 2L: all).

    Works on Python ints and on integer tensors (device-side, no sync): ``seen - c * (L - k)`` with
    ``c = max((seen - S) // L - 1, 0)`` compressed partitions.
    """
    if not isinstance(seen, torch.Tensor):
        return config.retained_length(seen)
    return seen - compressed_partitions(seen, config) * (config.lag_size - config.top_k)


def compressed_partitions(seen: int | torch.Tensor, config: LagConfig) -> int | torch.Tensor:
    """Partitions a recursive cache has compressed after ``seen`` tokens: ``max((seen - S) // L - 1, 0)``."""
    if isinstance(seen, torch.Tensor):
        parts = torch.div(seen - config.sink_size, config.lag_size, rounding_mode="floor")
        return (parts - 1).clamp(min=0)
    return max((seen - config.sink_size) // config.lag_size - 1, 0)


def cache_capacity(max_cache_len: int, config: LagConfig, max_chunk: int = 1, pad_to: int = DEFAULT_PAD_TO) -> int:
    """Slots per layer, batch row and KV head that `StaticLagKVCache` needs for ``max_cache_len`` tokens.

    The most tokens held at once: eq. 12 of the tokens seen before an update plus the (at most ``max_chunk``)
    tokens it appends, over every update up to ``max_cache_len`` tokens; the first update (the prompt) is
    compressed at once and never needs more than eq. 12. Rounded up to a multiple of ``pad_to``.
    """
    for name, value, low in (("max_cache_len", max_cache_len, 1), ("max_chunk", max_chunk, 1), ("pad_to", pad_to, 1)):
        check_int(name, value, low)
    seen = torch.arange(max_cache_len, dtype=torch.int64)  # tokens seen before an update
    held = stored_length(seen, config) + torch.clamp(max_cache_len - seen, max=max_chunk)
    need = max(int(held.max()), stored_length(max_cache_len, config))
    return math.ceil(need / pad_to) * pad_to


class StaticLagKVLayer(CacheLayerMixin):
    """One layer's view of a `StaticLagKVCache`: ``keys``/``values`` [B, H_kv, M, d] are views of the shared buffers.

    Updates go through the cache (`StaticLagKVCache.update`), which keeps the counters for all layers.
    """

    is_compileable = True
    is_sliding = False

    def __init__(self, cache: "StaticLagKVCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.cache._allocate(key_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.get_mask_sizes(query_length, self.layer_idx)

    def get_seq_length(self) -> int | torch.Tensor:
        return self.cache.get_seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        return self.cache.capacity

    def reset(self) -> None:  # the cache resets its buffers and counters once for all layers
        pass


class StaticLagKVCache(Cache):
    """A KV cache compressed by LagKV (METHOD.md §4, recursive) in fixed-size buffers: compileable, no host sync.

    Args:
        model_config: the model's config (``num_hidden_layers`` gives the layers).
        max_cache_len: the most tokens this cache will see (prompt + new tokens). Accepted: integer >= 1.
        config: the LagConfig (default LagConfig()).
        max_chunk: the most tokens one update after the first may append (1 = token-by-token decoding; a chunked
            prefill of L tokens at a time needs L). Sizes the buffers (`cache_capacity`).
        pad_to: buffer length rounded up to a multiple of this.
        compiled_selection: when the cache selects the prompt itself (no flex attention handed it its selection:
            the reference backend, forced selections), with the compiled scoring code of the flex backend. Default:
            on CUDA.
    Use it like transformers' ``StaticCache``, with a model prepared by `lrsa_viz.static_generate.enable_static_lagkv`
    (attention over the buffers), or through `lrsa_viz.static_generate.static_generate`.
    Batches must be unpadded (LagKV partitions count from each row's first token).
    """

    def __init__(self, model_config, max_cache_len: int, config: LagConfig | None = None, *, max_chunk: int = 1,
                 pad_to: int = DEFAULT_PAD_TO, compiled_selection: bool | None = None):
        if config is not None and not isinstance(config, LagConfig):
            raise ValueError(f"config must be a LagConfig or None, got {type(config).__name__}")
        layers = getattr(model_config, "num_hidden_layers", None)
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"model_config must be a model config with num_hidden_layers >= 1, got {model_config!r:.200}")
        self.lag_config = config or LagConfig()
        self.token_limit = max_cache_len  # the most tokens it may see
        self.capacity = cache_capacity(max_cache_len, self.lag_config, max_chunk, pad_to)
        self.max_chunk = max_chunk
        self.compiled_selection = compiled_selection
        super().__init__(layers=[StaticLagKVLayer(self, i) for i in range(layers)])
        self.key_buffer: torch.Tensor | None = None  # [layers, B, H_kv, M, d]
        self.value_buffer: torch.Tensor | None = None
        self.position_buffer: torch.Tensor | None = None  # [layers, B, H_kv, M] int32
        self._seen: torch.Tensor | None = None  # int64 scalar on the device
        self._done: torch.Tensor | None = None  # int64 scalar on the device
        self._overflow: torch.Tensor | None = None  # bool scalar: an update went past max_cache_len
        self._write_at: torch.Tensor | None = None  # [max_chunk] int64: slots of this update's new tokens (layer 0)
        self._empty = True  # host flag: no update yet (the next one is the one-shot prompt fill)
        self._filling = False  # host flag: the current update is the one-shot fill
        self._pending_span = 0  # host int: tokens after the scored partition that the next compression moves
        self._unfilled: dict[int, PromptFill] = {}  # layer -> its prompt, until the attention (or we) store it
        # `host_scheduled_compression`: updates leave compression to `before_update`, which decides from host counts.
        # A flag of its own, not `_host_counts is not None`: a compiled step reads it, and a bool guard stays valid
        # while the counts change at every step (reading the counts there would recompile the step every time)
        self.defer_compression = False
        self._host_counts: tuple[int, int] | None = None  # (seen, done) on the host, inside that context only

    # ------------------------------------------------------------------------------------------------ buffers
    def _allocate(self, key_states: torch.Tensor) -> None:
        """Allocate the buffers and counters for [B, H_kv, *, d] states (once; later calls check the shape)."""
        b, h, _, d = key_states.shape
        if self.key_buffer is not None:
            if self.key_buffer.shape[1:3] != (b, h) or self.key_buffer.shape[-1] != d:
                raise ValueError(
                    f"key_states: shape {tuple(key_states.shape)} does not continue the cache's [B, H_kv, *, d] = "
                    f"{(self.key_buffer.shape[1], self.key_buffer.shape[2], '*', self.key_buffer.shape[-1])}"
                )
            return
        layers, m, dev = len(self.layers), self.capacity, key_states.device
        self.key_buffer = torch.zeros(layers, b, h, m, d, dtype=key_states.dtype, device=dev)
        self.value_buffer = torch.zeros_like(self.key_buffer)
        self.position_buffer = torch.full((layers, b, h, m), -1, dtype=torch.int32, device=dev)
        self._seen = torch.zeros((), dtype=torch.int64, device=dev)
        self._done = torch.zeros((), dtype=torch.int64, device=dev)
        self._overflow = torch.zeros((), dtype=torch.bool, device=dev)
        self._write_at = torch.zeros(max(self.max_chunk, 1), dtype=torch.int64, device=dev)
        for i, layer in enumerate(self.layers):
            # views made once, here: the compiled step writes them in place (see `update`)
            layer.keys, layer.values = self.key_buffer[i], self.value_buffer[i]
            layer.dtype, layer.device = key_states.dtype, dev
            layer.batch_size, layer.num_heads, layer.k_head_dim, layer.v_head_dim = b, h, d, d
            layer.is_initialized = True
        if not torch.compiler.is_compiling():
            # fixed addresses: CUDA graphs replay in place (guard=False: a new cache re-records, never recompiles)
            layer_views = [t for layer in self.layers for t in (layer.keys, layer.values)]
            for t in (self.key_buffer, self.value_buffer, self.position_buffer, self._seen, self._done, self._overflow,
                      self._write_at, *layer_views):
                torch._dynamo.mark_static_address(t, guard=False)

    # ------------------------------------------------------------------------------------------------- update
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store [B, H_kv, q, d] post-RoPE states of one layer; return what that layer attends to.

        First update of an empty cache: returns the states themselves (the prompt attends to itself, e.g. through
        LRSA) and stores their one-shot LagKV compression. Later updates: returns this layer's whole buffers
        [B, H_kv, M, d]; valid are slots ``< stored + q`` (the mask builders get ``stored`` from
        `get_query_offset`).
        """
        q = key_states.shape[-2]
        if self._unfilled:  # a previous layer's attention did not store its prompt
            self._finish_fills()
        if layer_idx == 0:
            self._begin_update(key_states, value_states, q)
        if self._filling:
            self._fill_layer(key_states, value_states, layer_idx)
            return key_states, value_states
        if not torch.compiler.is_compiling() and (
                key_states.shape[:2] != self.key_buffer.shape[1:3] or key_states.shape[-1] != self.key_buffer.shape[-1]
                or value_states.shape != key_states.shape):
            raise ValueError(
                f"key_states/value_states: shapes {tuple(key_states.shape)}/{tuple(value_states.shape)} do not continue "
                f"the cache's [B, H_kv, *, d] = {tuple(self.key_buffer.shape[1:3])} + (*, {self.key_buffer.shape[-1]})"
            )
        # The layer's own views, made in `_allocate`. A view taken here, inside a compiled step, made inductor copy
        # the layer's whole [B, H_kv, M, d] slice around the one-slot write (functionalisation of an in-place write
        # into a view of a graph input; seen in the generated code): O(B M) bytes per token instead of O(B).
        layer = self.layers[layer_idx]
        keys, values = layer.keys, layer.values
        slots = self._write_at[:q]
        keys.index_copy_(2, slots, key_states.to(keys.dtype))
        values.index_copy_(2, slots, value_states.to(values.dtype))
        return keys, values

    def _begin_update(self, key_states: torch.Tensor, value_states: torch.Tensor, q: int) -> None:
        """Layer 0, once per update: the one-shot fill of an empty cache, or compress what is due and place the
        new tokens (all layers share the counters and the compression)."""
        if self._empty:
            if q > self.token_limit:
                raise ValueError(f"input: the first update has {q} tokens, more than max_cache_len={self.token_limit}")
            check_kv(key_states, value_states, finite="cpu")
            self._allocate(key_states)
            self._filling, self._empty = True, False
            self._seen.fill_(q)
            self._done.copy_(compressed_partitions(self._seen, self.lag_config))
            self._pending_span = self.lag_config.lag_size
            return
        self._filling = False
        if not torch.compiler.is_compiling() and q > self.max_chunk:
            raise ValueError(f"input: an update after the first may append at most max_chunk={self.max_chunk} tokens "
                             f"(the cache was sized for it), got {q}; build the cache with max_chunk >= {q}")
        if not self.defer_compression:  # else the driver compressed before this update (`before_update`)
            self._compress_pending()
        seen = self._seen
        stored = stored_length(seen, self.lag_config)
        # stored state (not new tensors) only: CUDA graphs must not keep step outputs alive between replays
        slots = self._write_at[:q]
        slots.copy_((stored + torch.arange(q, device=seen.device)).clamp(max=self.capacity - 1))
        new_positions = (seen + torch.arange(q, device=seen.device)).to(torch.int32)
        self.position_buffer.index_copy_(3, slots, new_positions.expand(*self.position_buffer.shape[:3], q))
        self._overflow.logical_or_(seen + q > self.token_limit)
        self._seen.add_(q)
        self._pending_span = self.lag_config.lag_size + q - 1

    @contextlib.contextmanager
    def host_scheduled_compression(self) -> Iterator["StaticLagKVCache"]:
        """Within: updates carry no compression work; the caller calls `before_update` before each update.

        By default every update compresses in place whatever the previous update made due, with fixed shapes and a
        device flag (``torch.where``): no host sync, but the window of every layer is read, scored and written back
        at every decoding step although a partition completes only once per L tokens. A decoding loop knows how many
        tokens it feeds, so it can decide on the host when a compression is due and run it only then: same
        compressions, same order ("use then compress"), same positions kept (tested); the update (a compiled,
        CUDA-graph step) then holds only the write and the attention. One host read on entry (the two counters),
        none per step; entering again inside is a no-op (so a caller can take the read before a sync-free region).
        """
        if self._empty:
            raise ValueError("host_scheduled_compression: the cache is empty; fill it with the prompt first")
        if self._host_counts is not None:  # already inside (nested): the outer context keeps the counts
            yield self
            return
        seen, done = torch.stack([self._seen, self._done]).tolist()
        self._host_counts, self.defer_compression = (seen, done), True
        try:
            yield self
        finally:
            self._host_counts, self.defer_compression = None, False

    def before_update(self, q: int) -> None:
        """Inside `host_scheduled_compression`: call before each update of ``q`` new tokens. Applies the
        compression the previous update made due (eagerly, decided from host counts) and counts the ``q`` tokens."""
        if self._host_counts is None:
            raise RuntimeError("before_update: only inside `with cache.host_scheduled_compression():`")
        self._finish_fills()
        seen, done = self._host_counts
        due = compressed_partitions(seen, self.lag_config)
        if due > done:
            self._compress_pending()
        self._host_counts = (seen + check_int("q", q, 1), max(due, done))

    def _fill_layer(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
        """One-shot LagKV compression of the prompt's states into this layer's slots 0 .. eq.12 - 1: handed to the
        attention (`PromptFill`) when there is something to select, else stored at once."""
        if self.lag_config.num_partitions(key_states.shape[-2]) >= 2 and not torch.compiler.is_compiling():
            fill = PromptFill(self, layer_idx, key_states, value_states)
            self._unfilled[layer_idx] = fill
            attach_prompt_fill(key_states, fill)
            return
        self._store_prompt(layer_idx, key_states, value_states, self._select_prompt(key_states, value_states))

    def _select_prompt(self, key_states: torch.Tensor, value_states: torch.Tensor) -> torch.Tensor:
        """The cache's own one-shot selection [B, H_kv, eq. 12] (`one_shot_keep`), for a prompt no attention stored."""
        compiled = key_states.is_cuda if self.compiled_selection is None else self.compiled_selection
        with torch.no_grad():
            return one_shot_keep(key_states, value_states, self.lag_config, compiled)

    def _store_prompt(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
                      keep: torch.Tensor) -> None:
        """Write the kept prompt tokens ``keep`` (LongTensor [B, H_kv, eq. 12], slot order) into the layer's slots."""
        with torch.no_grad():
            n_keep = keep.shape[-1]
            index = keep[..., None].expand(-1, -1, -1, key_states.shape[-1])
            layer = self.layers[layer_idx]
            layer.keys[:, :, :n_keep] = key_states.gather(2, index)
            layer.values[:, :, :n_keep] = value_states.gather(2, index)
            self.position_buffer[layer_idx, :, :, :n_keep] = keep

    def _finish_fills(self) -> None:
        """Store every prompt fill no attention stored (an attention other than the flex path's: its own selection)."""
        for fill in list(self._unfilled.values()):
            fill.finish()

    def _compress_pending(self) -> None:
        """Every compression the last update may have made due (one per L tokens of its span)."""
        span = self._pending_span
        for _ in range(-(-(span - self.lag_config.lag_size + 1) // self.lag_config.lag_size)):
            self._compress_one(span)

    @torch.no_grad()
    def _compress_one(self, span: int) -> None:
        """Compress the oldest due partition of every layer, if one is due; fixed shapes, no host sync.

        ``span``: tokens after the scored partition to move down (its reference plus anything appended after it;
        L for token-by-token decoding). Reads the window [F, F + L + span) of every layer, batch row and head.
        """
        cfg = self.lag_config
        s, lag, k, m = cfg.sink_size, cfg.lag_size, cfg.top_k, self.capacity
        seen, done = self._seen, self._done
        due = compressed_partitions(seen, cfg) > done  # bool scalar
        first = s + done * k  # slot F of the partition to compress
        dev = seen.device
        window = (first + torch.arange(lag + span, device=dev)).clamp(max=m - 1)
        dest = window[: k + span]  # same slots when nothing is due: the window is written back unchanged
        # through each layer's views, never the [layers, ...] buffers (see `update`: in a compiled step, writes into
        # both a buffer and views of it make inductor copy whole buffers)
        wk = torch.stack([layer.keys.index_select(2, window) for layer in self.layers])  # [layers, B, H, L + span, d]
        wv = torch.stack([layer.values.index_select(2, window) for layer in self.layers])
        wp = self.position_buffer.index_select(3, window)  # [layers, B, H, L + span]
        layers, b, h, _, d = wk.shape
        scores = token_std_scores(wk[:, :, :, : 2 * lag].flatten(0, 1), lag)  # [layers*B, H, 1, L]
        scores = scores + cfg.score_v_ratio * token_std_scores(wv[:, :, :, : 2 * lag].flatten(0, 1), lag)
        offsets = select_top_k(scores, k)[:, :, 0].reshape(layers, b, h, k)  # ascending, ties to the lower one
        pick = offsets[..., None].expand(-1, -1, -1, -1, d)
        for name, win, picked in (("keys", wk, wk.gather(3, pick)), ("values", wv, wv.gather(3, pick))):
            moved = torch.cat([picked, win[:, :, :, lag:]], dim=3)  # [layers, B, H, k + span, d]
            moved = torch.where(due, moved, win[:, :, :, : k + span])
            for i, layer in enumerate(self.layers):
                getattr(layer, name).index_copy_(2, dest, moved[i])
        moved_p = torch.cat([wp.gather(3, offsets.to(torch.int64)), wp[..., lag:]], dim=3)
        self.position_buffer.index_copy_(3, dest, torch.where(due, moved_p, wp[..., : k + span]))
        self._done.add_(due.to(done.dtype))

    # ------------------------------------------------------------------------------------- sizes and masking
    def get_seq_length(self, layer_idx: int = 0) -> int | torch.Tensor:
        """Tokens seen (not stored): the next token's position. A device scalar once the cache holds tokens."""
        return 0 if self._empty else self._seen

    def get_query_offset(self, layer_idx: int = 0) -> int | torch.Tensor:
        """Slot of the next update's first token (= tokens stored after the pending compression): the mask rule is
        ``slot <= offset + i`` over the buffer (see the module docstring)."""
        return 0 if self._empty else stored_length(self._seen, self.lag_config)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset): the prompt attends to itself; later updates to the whole buffer (M slots)."""
        return (query_length, 0) if self._empty else (self.capacity, 0)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    # ------------------------------------------------------------------------------------------- inspection
    def stored_length(self) -> int:
        """Tokens stored now (eq. 12 of the tokens seen). Reads the device counter: not for the decode loop."""
        return 0 if self._empty else int(stored_length(self._seen, self.lag_config))

    def flush(self) -> None:
        """Apply the compression the last update left pending (the next update would do it first)."""
        self._finish_fills()
        if self._empty or self._filling:
            return
        self._compress_pending()
        self._pending_span = self.lag_config.lag_size

    def check_overflow(self) -> None:
        """Raise ValueError if an update went past ``max_cache_len`` (checked on the device during decoding,
        read here: one sync)."""
        if self._overflow is not None and bool(self._overflow):
            raise ValueError(f"max_cache_len: more than {self.token_limit} tokens were fed to this cache; build it "
                             "with a larger max_cache_len (prompt + max_new_tokens)")

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Original positions of the stored tokens of one layer, ascending: LongTensor [B, H_kv, stored].

        Same layout as `LagKVCache.kept_positions`. Applies any pending compression first and reads the counters.
        """
        return self._kept_positions()[layer_idx].long()

    def _kept_positions(self) -> torch.Tensor:
        """[layers, B, H_kv, stored] int32 original positions of every layer (a view), after the pending compression."""
        self.check_overflow()
        self.flush()
        return self.position_buffer[:, :, :, :self.stored_length()]

    def kept_position_mask(self, seq_len: int | None = None) -> torch.Tensor:
        """[layers, B, H_kv, seq_len] bool (default: the tokens seen): which original positions each layer and head
        still stores."""
        positions = self._kept_positions().long()  # scatter_ takes int64 indices
        seen = seq_len if seq_len is not None else (0 if self._empty else int(self._seen))
        mask = torch.zeros(*positions.shape[:3], seen, dtype=torch.bool, device=positions.device)
        return mask.scatter_(-1, positions, True)

    def nbytes(self) -> int:
        """Bytes of the key and value buffers (allocated: all M slots of every layer)."""
        if self.key_buffer is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.key_buffer, self.value_buffer))

    def stored_nbytes(self) -> int:
        """Bytes of the keys and values stored now (eq. 12 of the tokens seen), comparable to `LagKVCache.nbytes`."""
        if self.key_buffer is None:
            return 0
        per_slot = self.key_buffer[:, :, :, 0].numel() * self.key_buffer.element_size() * 2
        return per_slot * self.stored_length()

    # --------------------------------------------------------------------------------------- cache protocol
    def reset(self) -> None:
        """Forget all tokens (buffers and their addresses are kept, so compiled decoding reuses its graphs)."""
        if self.key_buffer is not None:
            self.key_buffer.zero_()
            self.value_buffer.zero_()
            self.position_buffer.fill_(-1)
            self._seen.zero_()
            self._done.zero_()
            self._overflow.zero_()
        self._empty, self._filling, self._pending_span = True, False, 0
        for fill in list(self._unfilled.values()):  # prompts not stored: dropped with the rest
            fill.release()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._finish_fills()
        if self.key_buffer is not None:
            idx = beam_idx.to(self.key_buffer.device)
            for t in (self.key_buffer, self.value_buffer, self.position_buffer):
                t.copy_(t.index_select(1, idx))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("StaticLagKVCache cannot be cropped: evicted tokens cannot come back")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("StaticLagKVCache has a fixed batch size; build it for the expanded batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("StaticLagKVCache has a fixed batch size; build a new one for the selected rows")

    @property
    def is_croppable(self) -> bool:
        return False


class PromptFill:
    """One layer's prompt, waiting for the attention to store it with its own selection (`attach_prompt_fill`).

    `store` writes what the attention kept (one selection per layer, made inside its compiled region); `finish`
    stores the cache's own selection (`StaticLagKVCache._select_prompt`) if nothing was stored, e.g. with the
    reference backend or forced selections. Either releases the K/V and the key tensor's reference to the fill.
    """

    def __init__(self, cache: "StaticLagKVCache", layer_idx: int, key_states: torch.Tensor,
                 value_states: torch.Tensor):
        self.cache, self.layer_idx = cache, layer_idx
        self.keys: torch.Tensor | None = key_states  # [B, H_kv, N, d]
        self.values: torch.Tensor | None = value_states

    def store(self, kept: torch.Tensor) -> None:
        """``kept``: LongTensor [B, H_kv, eq. 12 of N], the positions kept, in slot order."""
        if self.keys is None:
            raise RuntimeError(f"layer {self.layer_idx}: its prompt was stored already")
        expected = (*self.keys.shape[:2], self.cache.lag_config.retained_length(self.keys.shape[-2]))
        if tuple(kept.shape) != expected:
            raise ValueError(f"kept must be [B, H_kv, eq. 12 of N] = {expected}, got {tuple(kept.shape)}")
        self.cache._store_prompt(self.layer_idx, self.keys, self.values, kept)
        self.release()

    def release(self) -> None:
        """Drop the K/V and every reference to this fill (the cache's, the key tensor's)."""
        if self.keys is not None:
            detach_prompt_fill(self.keys)
        self.keys = self.values = None
        self.cache._unfilled.pop(self.layer_idx, None)

    def finish(self) -> None:
        """Store the cache's own selection unless the prompt was stored already."""
        if self.keys is not None:
            self.store(self.cache._select_prompt(self.keys, self.values))


def one_shot_keep(keys: torch.Tensor, values: torch.Tensor, config: LagConfig, compiled: bool = False) -> torch.Tensor:
    """Positions one-shot LagKV compression keeps: `lrsa_viz.scoring.lagkv_keep_indices` [B, H_kv, eq. 12].

    ``compiled``: the same selection from `one_shot_compact` (the compiled scoring code of the flex LRSA backend),
    then the last full partition and the remainder whole (`lrsa_viz.fast.selection.one_shot_kept_index`).
    """
    compact = one_shot_compact(keys, values, config, compiled)
    if compact is None:
        return lagkv_keep_indices(keys, values, config, check_finite=False)
    from .fast.selection import one_shot_kept_index

    n = keys.shape[-2]
    return one_shot_kept_index(compact, n, config, config.retained_length(n))


def one_shot_compact(keys: torch.Tensor, values: torch.Tensor, config: LagConfig,
                     compiled: bool = True) -> torch.Tensor | None:
    """The sink and the selections of [B, H_kv, N, d] K/V from `lrsa_viz.fast.compiled_compact_positions`:
    LongTensor [B, H_kv, S + (P-1) k]; None unless ``compiled`` and there is a scored partition (P >= 2).

    The K/V are zero-padded to whole blocks as `lrsa_viz.fast.fast_lrsa_attention` pads them for its own selection
    (the unfused path compiles this same graph): one compilation per block count, not per prompt length. Exact:
    partitions 0 .. P-2 and their references (<= P-1) are real tokens; the padded partitions are cut off. Used when
    the cache selects a prompt itself (`PromptFill.finish`); with the flex attention the cache stores its selection.
    """
    n = keys.shape[-2]
    p = config.num_partitions(n)
    if not compiled or p < 2:
        return None
    import torch.nn.functional as F

    from .fast import DEFAULT_BLOCK_SIZE, compiled_compact_positions

    width = -(-n // DEFAULT_BLOCK_SIZE) * DEFAULT_BLOCK_SIZE  # the fast path's layout length (LrsaLayout.seq_len)
    if width != n:
        keys, values = (F.pad(t, (0, 0, 0, width - n)) for t in (keys, values))
    count = config.sink_size + (p - 1) * config.top_k
    return compiled_compact_positions()(keys, values, config)[..., :count]

