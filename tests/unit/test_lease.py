"""The lease's pure parts: names, margins, values, the ha config. (The stores: tests/integration/test_lease.py.)"""

from __future__ import annotations

import pytest

from supervisor.config import Config
from supervisor.lease import _parse_value, default_holder, lease_name, safety_margin


def cfg(**ha) -> Config:
    return Config.model_validate({"broker": {"url": "redis://:s3cr3tpass@127.0.0.1:6379/0"},
                                  "groups": [{"name": "web", "hostnames": ["celery@web-*"]},
                                             {"name": "batch", "hostnames": ["celery@batch-*"]}],
                                  "ha": ha})


def test_lease_name_is_derived_from_the_groups_never_from_secrets():
    a = lease_name(cfg())
    assert a.startswith("groups-") and "s3cr3t" not in a
    assert a == lease_name(cfg()), "stable: replicas of one config agree"
    other = Config.model_validate({"broker": {"url": "redis://127.0.0.1:6379/0"},
                                   "groups": [{"name": "batch", "hostnames": ["x@*"]},
                                              {"name": "web", "hostnames": ["y@*"]}]})
    assert lease_name(other) == a, "the group names decide, in any order"
    assert lease_name(cfg(name="payments")) == "payments"


def test_ha_name_must_fit_a_redis_key_and_a_kubernetes_object_name():
    with pytest.raises(ValueError, match="ha.name|pattern"):
        cfg(name="Not A Name")
    assert cfg(name="web-fleet.eu").ha.name == "web-fleet.eu"


def test_lease_ttl_has_a_floor():
    with pytest.raises(ValueError):
        cfg(lease_ttl="200ms")


def test_safety_margin_is_a_tenth_of_the_ttl_within_bounds():
    assert safety_margin(15) == 1.5
    assert safety_margin(3) == pytest.approx(0.3)
    assert safety_margin(60) == 2.0
    assert safety_margin(0.5) == 0.1


def test_values_and_holders():
    assert _parse_value(b"12 host:1:ab") == ("host:1:ab", 12)
    assert _parse_value(None) == (None, None)
    assert _parse_value("garbage") == ("garbage", None)
    h1, h2 = default_holder(), default_holder()
    assert h1 != h2 and h1.count(":") == 2
