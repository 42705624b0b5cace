"""Property-based: config.example.yaml mutated as a careless user or an attacker would (keys deleted,
values replaced by other YAML types, huge or odd strings, lone surrogates, negative and huge numbers,
entries duplicated, subtrees nested and moved; and the YAML text itself cut, spliced and garbled)
goes through the real `check-config` command. It must exit 0 (valid) or 2 (invalid, every error on
a line of its own), never print a traceback, never exit 1 or 3.

In-process through click's CliRunner for speed (1,000 + 400 examples); a handful of the same cases
run through a real subprocess in tests/integration/test_cli_hostile.py. Derandomized and without
an example database: CI runs the same examples every time.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path

import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import redact
from supervisor.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_TEXT = (REPO / "config.example.yaml").read_text(encoding="utf-8")
EXAMPLE = yaml.safe_load(EXAMPLE_TEXT)
# the example's ${VAR:-default}s take their defaults; no stray SUPERVISOR_CONFIG
ENV = {"CELERY_BROKER_URL": None, "MATTERMOST_URL": None, "SUPERVISOR_CONFIG": None, "SMTP_PASSWORD": None}


def _keys(node, out: set) -> set:
    if isinstance(node, dict):
        for k, v in node.items():
            out.add(k)
            _keys(v, out)
    elif isinstance(node, list):
        for v in node:
            _keys(v, out)
    return out


KEYS = sorted(_keys(EXAMPLE, set()) | {"for", "selector", "mode", "app", "instance", "token", "docker", "kubernetes",
                                      "cloudfoundry", "api_url", "master_name", "transport_options"})

HOSTILE_STRINGS = [
    "", " ", "\n", "\t", "\x1b[31m", "\0", "a\0b", "\ud800", "celery@\udcff*", "redis://h\ud800:6379/0",
    "{hostname:d}", "{hostname!x}", "{hostname:>9999999}", "{}", "{0}", "{pod}", "{hostname", "}", "{{", "it's {hostname}",
    '"', "\\", "${UNSET_FUZZ_VAR}", "${X:-}", "$$", "${", "redis://h:99999/0", "redis://:S3CRET#tail@h:6379/9",
    "rediss://h/0?ssl_cert_reqs=bogus", "sentinel://h:1;sentinel://h:99999", "redis+socket:///tmp/r.sock",
    "amqp://guest:guest@h:5672//", "http://u:p@h/", "/dev/zero", "-5s", "1e300", "60", "60s", "10 parsecs", "off", "on",
    "1h30m", "0", "nan", "inf", "-inf", "365d", "366d", "celery@*", "celery@default-1", "../../etc/passwd",
    "x" * 5000, "/" + "a" * 300, "/tmp/" + "b" * 5000, "mmosts://", "json://127.0.0.1:1/x", "kubernetes", "local",
    "systemd", "docker", "cloudfoundry", "nomad", "auto", "critical", "127.0.0.1:99999", ":9811", "[::1]:9811",
]
HUGE_NUMBERS = [10 ** 18, -(10 ** 18), 10 ** 99, 2 ** 64, -1, 0, 1e300, -1e300, 1e-300, 0.05]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10 ** 6), max_value=10 ** 6),
    st.sampled_from(HUGE_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(HOSTILE_STRINGS),
    st.text(st.characters(exclude_categories=()), max_size=12),  # any code point, lone surrogates too
    st.integers(min_value=1000, max_value=300_000).map(lambda n: "y" * n),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), children, max_size=3),
    ),
    max_leaves=6,
)
keys = st.one_of(st.sampled_from(KEYS), st.text(st.characters(exclude_categories=()), max_size=8))


def node_paths(node, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += node_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += node_paths(v, prefix + (i,))
    return out


def get(doc, path: tuple):
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def mutated_docs(draw):
    """config.example.yaml as data, mutated 1 to 4 times."""
    doc = copy.deepcopy(EXAMPLE)
    for _ in range(draw(st.integers(1, 4))):
        if not isinstance(doc, (dict, list)):
            break
        paths = node_paths(doc)
        # half the time a section or one of its direct settings (notify.channels, broker.url ...), the
        # places a type confusion hurts most; else any node (a glob, a template, a list entry)
        shallow = [p for p in paths if len(p) <= 2]
        path = draw(st.sampled_from(shallow if draw(st.booleans()) else paths))
        op = draw(st.sampled_from(["delete", "replace", "replace", "replace", "duplicate", "nest", "move", "add", "deep"]))
        target = get(doc, path)
        parent, key = (get(doc, path[:-1]), path[-1]) if path else (None, None)

        def put(value, parent=parent, key=key):
            nonlocal doc
            if parent is None:
                doc = value
            else:
                parent[key] = value

        if op == "delete":
            if parent is None:
                doc = None
            else:
                del parent[key]
        elif op == "replace":
            put(draw(values))
        elif op == "duplicate":
            if isinstance(parent, list):
                parent.append(copy.deepcopy(target))
            elif isinstance(parent, dict):
                parent[draw(keys)] = copy.deepcopy(target)
        elif op == "nest":
            put([target] if draw(st.booleans()) else {draw(keys): target})
        elif op == "move":  # another subtree of the document here (groups under loop, a URL as a group ...)
            put(copy.deepcopy(get(doc, draw(st.sampled_from(node_paths(doc))))))
        elif op == "add":
            if isinstance(target, dict):
                target[draw(keys)] = draw(values)
            elif isinstance(target, list):
                target.append(draw(values))
        else:  # deep
            value = target
            for _ in range(draw(st.integers(1, 80))):
                value = [value] if draw(st.booleans()) else {"a": value}
            put(value)
    return doc


YAML_BITS = ["{", "}", "[", "]", "&a ", "*a", "!!str ", "!!binary ", "!!python/object ", "? ", ": ", "- ", "#", "'", '"',
             "|", ">", "%YAML 1.1\n", "---\n", "...\n", "<<: *a\n", "\t", "\n", "  ", "off", "yes", "~", ".nan", "0x1F",
             "0o17", "1:30", "2001-12-14", "\\ud800", "\ufeff", "\x85", "\u2028", "@", "`", "%"]


def _inline_bomb(levels: int) -> str:
    parts = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "[" + ", ".join(parts) + "]"


# a value as YAML text (what a data-level mutation cannot express: aliases, tags, depth, huge literals)
VALUE_SNIPPETS = ["&g [*g]", "&m {a: *m}", "[" * 1200 + "]" * 1200, "{a: " * 400 + "1" + "}" * 400, "9" * 5000,
                  "-" + "1" * 4400, '"celery@\\ud800*"', '["celery@\\ud800*"]', '"redis://h\\udcff:6379/0"', '"\\udcff"', '"a\\0b"', "off", "on", "yes", "5", "true", "1.5",
                  "[]", "{}", "~", "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1]", "2001-12-14", "1:30",
                  ".nan", "-.inf", "'{hostname:d}'", "'{hostname:>9999999}'", "\"it's {hostname}\"", "*undefined",
                  "!!python/object:os.system x", "!custom x", "<<: {a: 1}", _inline_bomb(7), "'" + "z" * 100_000 + "'"]
_SETTING = re.compile(r"^(\s*(?:- )?[A-Za-z_]+:)[ \t]*(\S.*)?$")


@st.composite
def mutated_texts(draw):
    """config.example.yaml as text, garbled 1 to 3 times (the YAML layer: syntax, tags, anchors)."""
    text = EXAMPLE_TEXT
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["value", "value", "value", "insert", "insert", "delete", "replace_line", "dup_line",
                                   "truncate", "unindent"]))
        pos = draw(st.integers(0, len(text)))
        if op == "value":  # a setting's value replaced by a snippet of YAML
            lines = text.split("\n")
            settings_at = [i for i, line in enumerate(lines) if _SETTING.match(line)]
            if not settings_at:  # cut away by an earlier mutation
                continue
            i = draw(st.sampled_from(settings_at))
            lines[i] = _SETTING.match(lines[i])[1] + " " + draw(st.sampled_from(VALUE_SNIPPETS))
            text = "\n".join(lines)
        elif op == "insert":
            bit = draw(st.one_of(st.sampled_from(YAML_BITS), st.text(st.characters(exclude_categories=()), max_size=6)))
            text = text[:pos] + bit + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 40)):]
        elif op in ("replace_line", "dup_line", "unindent"):
            lines = text.split("\n")
            i = draw(st.integers(0, len(lines) - 1))
            if op == "replace_line":
                lines[i] = draw(st.one_of(st.sampled_from(YAML_BITS), st.text(max_size=30)))
            elif op == "dup_line":
                lines.insert(i, lines[i])
            else:
                lines[i] = lines[i].lstrip()
            text = "\n".join(lines)
        else:
            text = text[:pos]
    return text


HEADER = re.compile(r"^(?P<file>.+): invalid config \((?P<n>\d+) errors?\):$")


class CheckConfig:
    """Runs `supervisor check-config -c FILE` in-process and checks the contract on each result."""

    def __init__(self, path: Path):
        self.path = path
        self.runner = CliRunner()
        self.codes: Counter = Counter()
        self.tracebacks = 0

    def write_doc(self, doc) -> None:
        # allow_unicode=False: a lone surrogate is written as the YAML escape "\ud800", which loads back as one
        self.path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=False), encoding="ascii")

    def write_text(self, text: str) -> None:
        self.path.write_bytes(text.encode("utf-8", "surrogatepass"))  # a lone surrogate: not UTF-8 at all

    def check(self, what) -> None:
        redact.forget_all()  # each example registers its own secrets (process-wide registry)
        r = self.runner.invoke(main, ["check-config", "-c", str(self.path)], env=ENV, catch_exceptions=True)
        shown = f"check-config exited {r.exit_code} for\n{what!r:.3000}\n--- output\n{r.output[:3000]}"
        if "Traceback" in r.output or (r.exception is not None and not isinstance(r.exception, SystemExit)):
            self.tracebacks += 1
        self.codes[r.exit_code] += 1
        assert r.exception is None or isinstance(r.exception, SystemExit), f"{shown}\nraised {r.exception!r}"
        assert "Traceback" not in r.output, shown
        assert r.exit_code in (0, 2), shown
        if r.exit_code == 0:
            assert r.stdout.startswith(f"{self.path}: OK\n"), shown
            return
        lines = r.stderr.splitlines()
        m = HEADER.match(lines[0]) if lines else None
        assert m, shown
        # one line per error, each "  path: reason" (or "  reason" for the file as a whole)
        errors = lines[1:]
        assert len(errors) == int(m["n"]) and all(e.startswith("  ") and e.strip() for e in errors), shown


FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def test_check_config_on_mutated_configs(tmp_path):
    """1,000 mutated documents: exit 0 or 2, no traceback. Both outcomes must occur often: a
    generator that only produced garbage (or only valid files) would test little."""
    cc = CheckConfig(tmp_path / "fuzz.yaml")

    @FUZZ
    @given(mutated_docs())
    def run(doc):
        cc.write_doc(doc)
        cc.check(doc)

    run()
    print(f"\nfuzz (documents): {sum(cc.codes.values())} cases, exit codes {dict(cc.codes)}, "
          f"tracebacks {cc.tracebacks}")
    assert sum(cc.codes.values()) >= 1000
    assert cc.codes[0] >= 30 and cc.codes[2] >= 500, dict(cc.codes)


def test_check_config_on_garbled_yaml(tmp_path):
    """400 garbled texts: the YAML layer (syntax, tags, anchors, odd characters) answers the same way."""
    cc = CheckConfig(tmp_path / "fuzz.yaml")

    @settings(FUZZ, max_examples=400)
    @given(mutated_texts())
    def run(text):
        cc.write_text(text)
        cc.check(text)

    run()
    print(f"\nfuzz (texts): {sum(cc.codes.values())} cases, exit codes {dict(cc.codes)}, tracebacks {cc.tracebacks}")
    assert cc.codes[0] >= 20 and cc.codes[2] >= 100, dict(cc.codes)
