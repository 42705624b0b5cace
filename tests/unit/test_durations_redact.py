"""durations.py and redact.py."""

from __future__ import annotations

import logging

import pytest

from supervisor import redact
from supervisor.durations import format_duration, parse_duration


class TestParseDuration:
    @pytest.mark.parametrize("text,seconds", [
        ("500ms", 0.5), ("10s", 10), ("5m", 300), ("1h", 3600), ("1d", 86400), ("1h30m", 5400),
        ("1m30s", 90), ("2h5m10s", 7510), ("1.5h", 5400), ("0.25s", 0.25), ("0s", 0), ("10", 10), ("2.5", 2.5),
        ("10S", 10), (" 10 s ", 10), ("1h 30m", 5400), (0, 0), (7, 7), (1.25, 1.25),
    ])
    def test_accepted(self, text, seconds):
        assert parse_duration(text) == pytest.approx(seconds)

    @pytest.mark.parametrize("bad", [
        "", "ten", "10 parsecs", "10x", "s", "5s10", "-5s", "-5", -1, "1h-30m", "1..5s", True, False, None,
        [5], {"s": 5}, "-inf",
    ])
    def test_rejected(self, bad):
        with pytest.raises(ValueError) as e:
            parse_duration(bad)
        assert "duration" in str(e.value)

    @pytest.mark.parametrize("bad", ["nan", "NaN", float("nan"), "inf", "1e400", float("inf")])
    def test_not_a_finite_number_of_seconds_is_rejected(self, bad):
        # YAML `.nan` / "nan" passes every `<` check: `heartbeat_timeout: nan` would make `silent > nan`
        # always false, so no worker could ever be judged lost, and `interval: nan` would break the loop.
        with pytest.raises(ValueError):
            parse_duration(bad)

    def test_message_shows_the_forms(self):
        with pytest.raises(ValueError, match="500ms, 10s, 5m, 1h"):
            parse_duration("soon")


class TestFormatDuration:
    @pytest.mark.parametrize("seconds,text", [
        (None, "-"), (0.85, "850ms"), (12.34, "12.3s"), (245, "4m05s"), (7800, "2h10m"), (60, "1m00s"),
    ])
    def test_format(self, seconds, text):
        assert format_duration(seconds) == text


class TestRedactUrl:
    @pytest.mark.parametrize("url,shown", [
        ("redis://:s3cret@redis.internal:6379/0", "redis://:****@redis.internal:6379/0"),
        ("amqp://guest:guest-pw@rabbit:5672//", "amqp://guest:****@rabbit:5672//"),
        ("amqps://user@rabbit.example.com/vhost", "amqps://user@rabbit.example.com/vhost"),
        ("redis://localhost", "redis://localhost"),
        ("redis://:pw@[::1]:6380/2", "redis://:****@[::1]:6380/2"),
        ("https://admin:p%40ss@api.cf.example:443/v3?token=abc", "https://admin:****@api.cf.example:443/v3"),
        ("", ""),
        (None, ""),
    ])
    def test_keeps_host_port_user_hides_password(self, url, shown):
        assert redact.redact_url(url) == shown

    def test_unparsable_url_is_masked_whole(self):
        assert redact.redact_url("redis://:pw@host:notaport/0") == redact.MASK

    def test_apprise_url_shows_only_the_service(self):
        assert redact.redact_apprise_url("mmosts://chat.example.com/abcdef123456") == "mmosts://****"


class TestScrub:
    def test_registered_secret_is_masked_anywhere(self):
        redact.register_secret("Tr0ub4dor&3-unique")
        assert redact.scrub("auth failed for 'Tr0ub4dor&3-unique' (twice: Tr0ub4dor&3-unique)") == \
            "auth failed for '****' (twice: ****)"

    def test_url_encoded_form_is_masked_too(self):
        redact.register_secret("p@ss/w0rd!xyz")
        assert "p%40ss%2Fw0rd%21xyz" not in redact.scrub("GET https://h/?pw=p%40ss%2Fw0rd%21xyz")

    def test_unregistered_url_password_is_masked(self):
        assert redact.scrub("cannot connect to redis://:never-registered@h:6379/0: refused") == \
            "cannot connect to redis://:****@h:6379/0: refused"
        assert redact.scrub("amqp://alice:other-pw@rabbit:5672//") == "amqp://alice:****@rabbit:5672//"

    def test_short_values_are_not_registered(self):
        redact.register_secret("abc")
        assert redact.scrub("abc abcd") == "abc abcd"

    def test_apprise_url_tokens(self):
        url = "mmosts://chat.example.com/aZ9xQ7wE5rT3yU1i"
        redact.register_url(url, tokens=True)
        assert "aZ9xQ7wE5rT3yU1i" not in redact.scrub(f"delivery to {url} failed")
        assert redact.scrub("token aZ9xQ7wE5rT3yU1i in a library log") == "token **** in a library log"

    def test_broker_url_registers_its_password(self):
        redact.register_url("redis://:brk-Pass-4242@h:6379/0")
        assert redact.scrub("AUTH brk-Pass-4242 rejected") == "AUTH **** rejected"

    def test_log_filter_scrubs_messages_args_and_tracebacks(self):
        redact.register_secret("log-Secret-5150")
        records: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record)

        h = Keep()
        redact.install_log_filter(h)
        redact.install_log_filter(h)  # idempotent
        assert len(h.filters) == 1
        log = logging.getLogger("test.redact")
        log.addHandler(h)
        log.propagate = False
        try:
            log.warning("connecting with %s", "log-Secret-5150")
            try:
                raise RuntimeError("bad password log-Secret-5150")
            except RuntimeError:
                log.exception("failed")
        finally:
            log.removeHandler(h)
        assert records[0].getMessage() == "connecting with ****"
        assert "log-Secret-5150" not in records[1].exc_text
        assert "****" in records[1].exc_text
