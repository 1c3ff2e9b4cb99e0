from __future__ import annotations

from plantwatch.analytics.health import device_health, factory_health


def test_factory_health_follows_the_factoryops_formula() -> None:
    health = factory_health({"critical": 2, "high": 5, "medium": 12, "low": 8}, offline_devices=3)
    assert health.score == 100 - 2 * 5 - 5 * 2 - 3  # 77
    assert health.deductions[0] == ("2 critical alerts open", 10)
    assert ("3 devices offline", 3) in health.deductions
    assert health.label == "fair"


def test_a_quiet_factory_scores_100_and_the_score_never_goes_negative() -> None:
    assert factory_health({}, 0).score == 100
    assert factory_health({}, 0).deductions == []
    assert factory_health({"critical": 50}, 10).score == 0
    assert factory_health({"critical": 50}, 10).label == "critical"


def test_device_health_weighs_alerts_offline_and_limits() -> None:
    health = device_health(False, {"high": 1}, {"warning": 2, "critical": 1})
    assert health.score == 100 - 15 - 20 - 8 - 10
    assert health.deductions[0][0] == "offline"
    assert device_health(None, {}, {}).score == 100  # never seen: nothing known against it
    assert device_health(True, {"critical": 1}, {}).label == "fair"
