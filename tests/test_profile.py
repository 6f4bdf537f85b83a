import pytest

from lrsa_viz.profile import environment_record, run_profile


def test_profile_choice(monkeypatch):
    monkeypatch.delenv("LRSA_VIZ_PROFILE", raising=False)
    assert run_profile() in ("quick", "full")
    assert run_profile("full") == "full"
    monkeypatch.setenv("LRSA_VIZ_PROFILE", "quick")
    assert run_profile() == "quick"
    monkeypatch.setenv("LRSA_VIZ_PROFILE", "fast")
    with pytest.raises(ValueError, match="LRSA_VIZ_PROFILE"):
        run_profile()


def test_environment_record_names_torch_and_device():
    rec = environment_record()
    assert rec["torch"] and rec["device"]
