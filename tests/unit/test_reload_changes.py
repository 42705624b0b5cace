"""What a SIGHUP reload says it changed (daemon.config_changes): one item per setting, secrets hidden."""

from __future__ import annotations

from supervisor.config import parse_config
from supervisor.daemon import config_changes

OLD_PW, NEW_PW = "old-pass-8812", "new-pass-9923"


def cfg(**over):
    data = {"broker": {"url": f"redis://:{OLD_PW}@localhost/0"}, "loop": {"interval": "1s"},
            "groups": [{"name": "g", "workers": ["celery@a"], "min_workers": 1}],
            "queues": [{"name": "q", "warning": 5}]}
    data.update(over)
    return parse_config(data, env={})


def test_changes_are_listed_per_setting_and_secrets_never_shown():
    old = cfg()
    new = cfg(broker={"url": f"redis://:{NEW_PW}@localhost/0"}, loop={"interval": "2s"},
              groups=[{"name": "g", "workers": ["celery@a", "celery@b"], "min_workers": 2},
                      {"name": "g2", "hostnames": ["celery@x-*"]}],
              queues=[], http={"listen": "127.0.0.1:9811"})
    changes = config_changes(old, new)
    assert changes == [
        "queues[q] removed",
        "groups[g2] added",
        "broker.url: (secret) -> (secret)",
        "loop.interval: 1.0 -> 2.0",
        "groups[g].workers: ['celery@a'] -> ['celery@a', 'celery@b']",
        "groups[g].min_workers: 1 -> 2",
        "http.listen: None -> 127.0.0.1:9811",
    ]
    assert not any(OLD_PW in c or NEW_PW in c for c in changes)
    assert config_changes(old, cfg()) == []


def test_long_lists_are_cut():
    old = cfg(groups=[])
    new = cfg(groups=[{"name": f"g{i}", "hostnames": ["x*"]} for i in range(20)])
    changes = config_changes(old, new)
    assert len(changes) == 13 and changes[-1] == "and 8 more"
