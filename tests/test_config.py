import pytest

from lrsa_viz import LagConfig


def test_defaults_follow_method():
    cfg = LagConfig()
    assert (cfg.sink_size, cfg.lag_size, cfg.ratio, cfg.score_v_ratio) == (16, 128, 0.25, 1.0)
    assert cfg.top_k == 32
    assert cfg.min_compressible_length == 16 + 256


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sink_size": -1}, "sink_size"),
        ({"sink_size": 1.5}, "sink_size"),
        ({"lag_size": 0}, "lag_size"),
        ({"lag_size": True}, "lag_size"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 1.01}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"ratio": 0.1, "lag_size": 4}, "ratio \\* lag_size"),
        ({"score_v_ratio": -1.0}, "score_v_ratio"),
        ({"score_v_ratio": float("inf")}, "score_v_ratio"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LagConfig(**kwargs)


@pytest.mark.parametrize("n, expected", [(0, 0), (100, 100), (271, 271), (272, 16 + 32 + 128), (1000, 16 + 32 * 6 + 128 + 88)])
def test_retained_length_eq12(n, expected):
    assert LagConfig().retained_length(n) == expected


def test_dict_roundtrip_and_unknown_field():
    cfg = LagConfig(4, 64, 0.125, 0.5)
    assert LagConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown LagConfig field"):
        LagConfig.from_dict({"sink": 3})
