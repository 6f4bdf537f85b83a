"""`LagConfig`: the four numbers that define LagKV compression and the LRSA mask (docs/METHOD.md §1)."""
from __future__ import annotations

import dataclasses
import math
import numbers

from .checks import check_fields


@dataclasses.dataclass(frozen=True)
class LagConfig:
    """LagKV / LRSA parameters.

    Attributes:
        sink_size: S, the first S tokens are always kept. Accepted: integer >= 0.
        lag_size: L, partition length and reference-window length. Accepted: integer >= 1.
        ratio: r, fraction of each scored partition that is KEPT. Accepted: 0 < r <= 1 with int(r * L) >= 1.
        score_v_ratio: weight of the value score in ``a_K + score_v_ratio * a_V``. Accepted: finite, >= 0.
    """

    sink_size: int = 16
    lag_size: int = 128
    ratio: float = 0.25
    score_v_ratio: float = 1.0

    def __post_init__(self) -> None:
        # numpy scalars (np.int64, np.float32, ...) become plain Python numbers; anything else is checked below
        for name, kind, cast in (("sink_size", numbers.Integral, int), ("lag_size", numbers.Integral, int),
                                 ("ratio", numbers.Real, float), ("score_v_ratio", numbers.Real, float)):
            value = getattr(self, name)
            if isinstance(value, kind) and not isinstance(value, bool) and type(value) not in (int, float):
                object.__setattr__(self, name, cast(value))
        for name in ("sink_size", "lag_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
        if self.sink_size < 0:
            raise ValueError(f"sink_size must be >= 0, got {self.sink_size}")
        if self.lag_size < 1:
            raise ValueError(f"lag_size must be >= 1, got {self.lag_size}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not math.isfinite(self.ratio):
            raise ValueError(f"ratio must be a finite number in (0, 1], got {self.ratio!r}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if int(self.ratio * self.lag_size) < 1:
            raise ValueError(
                f"ratio * lag_size must keep at least one token per partition: int({self.ratio} * {self.lag_size}) = "
                f"{int(self.ratio * self.lag_size)}; use ratio >= {1 / self.lag_size:.6g} for lag_size={self.lag_size}"
            )
        v = self.score_v_ratio
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"score_v_ratio must be a finite number >= 0, got {v!r}")

    @property
    def top_k(self) -> int:
        """Tokens kept per scored partition: ``int(ratio * lag_size)``."""
        return int(self.ratio * self.lag_size)

    @property
    def min_compressible_length(self) -> int:
        """Shortest sequence that gets compressed at all: ``S + 2L``."""
        return self.sink_size + 2 * self.lag_size

    def num_partitions(self, seq_len: int) -> int:
        """P = floor((n - S) / L): full partitions after the sink (0 if n <= S)."""
        return max(0, (seq_len - self.sink_size) // self.lag_size)

    def retained_length(self, seq_len: int) -> int:
        """Tokens kept by one-shot compression of ``seq_len`` tokens (docs/METHOD.md eq. 12)."""
        if seq_len < 0:
            raise ValueError(f"seq_len must be >= 0, got {seq_len}")
        if seq_len < self.min_compressible_length:
            return seq_len
        p = self.num_partitions(seq_len)
        remainder = (seq_len - self.sink_size) % self.lag_size
        return self.sink_size + self.top_k * (p - 1) + self.lag_size + remainder

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LagConfig":
        check_fields(cls, d, "LagConfig")
        return cls(**d)
