"""Reading the config file with limits: what a careless user or an attacker can put in `-c FILE`.

- only a regular file is read (a FIFO, a device, a socket or a directory is refused before it is
  opened, and it is opened with O_NONBLOCK: a FIFO swapped in at the last moment cannot block);
- at most ``MAX_BYTES`` are read (``-c /dev/zero`` is refused, never read to the end of memory);
- the YAML is parsed by a SafeLoader that refuses nesting deeper than ``MAX_DEPTH``, a document
  of more than ``MAX_NODES`` values once its aliases are expanded (an "alias bomb" of a few
  hundred bytes), a recursive alias (``groups: &g [*g]``), an integer of more than
  ``MAX_INT_DIGITS`` digits and a key given twice in one mapping.

Every problem is a ``FileProblem`` (one line, with the YAML line and column when there is one);
nothing else escapes ``read_yaml``.
"""

from __future__ import annotations

import errno
import os
import stat

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

MAX_BYTES = 1024 * 1024  # a config is a few KiB; 1 MiB is generous and parses in about 2 s at worst
MAX_DEPTH = 50  # the schema nests 6 deep (groups.0.restart.env.NAME); transport options a little more
MAX_NODES = 50_000  # values in the document once aliases are expanded (a large fleet uses a few thousand)
MAX_INT_DIGITS = 100  # Python refuses int("9" * 4301); no field of the schema needs more than 10 digits


class FileProblem(Exception):
    """The file cannot be read or is not YAML we accept: one line fit to print."""


class _Limit(yaml.MarkedYAMLError):
    pass


def read_text(path: str | os.PathLike) -> str:
    """The file's text (UTF-8), refusing what is not a regular file of at most MAX_BYTES."""
    name = os.fsdecode(path)
    shown = repr(name)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileProblem(f"config file {shown} does not exist") from None
    except PermissionError:
        raise FileProblem(f"config file {shown} is not readable (permission denied on a directory of its path)") from None
    except (OSError, ValueError) as e:  # ENAMETOOLONG, ELOOP, ENOTDIR, an embedded NUL ...
        raise FileProblem(f"cannot read config file {shown}: {_why(e)}") from None
    _require_regular(st.st_mode, shown)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise FileProblem(f"config file {shown} is not readable (permission denied)") from None
    except OSError as e:
        raise FileProblem(f"cannot read config file {shown}: {_why(e)}") from None
    try:
        _require_regular(os.fstat(fd).st_mode, shown)  # the path may have been swapped since the stat
        chunks, size = [], 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise FileProblem(f"cannot read config file {shown}: {_why(e)}") from None
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        raise FileProblem(f"config file {shown} is larger than {MAX_BYTES // 1024} KiB: is it the right file?")
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise FileProblem(f"cannot read config file {shown}: it is not UTF-8 text "
                          f"(byte 0x{data[e.start]:02x} on line {line})") from None


def _require_regular(mode: int, shown: str) -> None:
    if stat.S_ISREG(mode):
        return
    what = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise FileProblem(f"config file {shown} is {what}: give the path of a YAML file")


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        if e.errno == errno.ENAMETOOLONG:
            return "the path is too long"
        return os.strerror(e.errno).lower()
    return str(e)


class LimitedLoader(yaml.SafeLoader):
    """yaml.SafeLoader with bounds on depth, size after alias expansion, integers and duplicate keys."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Limit(problem=f"nested deeper than {MAX_DEPTH} levels",
                             problem_mark=self.peek_event().start_mark)
            if self._nodes > MAX_NODES:
                raise _Limit(problem=f"more than {MAX_NODES} values in the file",
                             problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, ScalarNode):
                    continue
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise _Limit(problem=f"the key {key_node.value!r} is given twice in one mapping "
                                         "(the first would be ignored)", problem_mark=key_node.start_mark)
                seen[key] = True
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        digits = sum(c.isalnum() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise _Limit(problem=f"an integer of {digits} digits: no setting takes a number this large",
                         problem_mark=node.start_mark)
        return SafeConstructor.construct_yaml_int(self, node)


LimitedLoader.add_constructor("tag:yaml.org,2002:int", LimitedLoader.construct_yaml_int)


def _children(node) -> list:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root) -> None:
    """Refuse a recursive alias, and a document whose aliases expand to more than MAX_NODES values
    (the loader shares aliased objects, but every consumer of the data walks them once per use)."""
    if root is None:
        return
    size: dict[int, int] = {}
    active: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        nid = id(node)
        if done:
            active.discard(nid)
            size[nid] = min(MAX_NODES + 1, 1 + sum(size[id(c)] for c in _children(node)))
            if size[nid] > MAX_NODES:
                raise _Limit(problem=f"its aliases (*name) expand to more than {MAX_NODES} values",
                             problem_mark=node.start_mark)
            continue
        if nid in size:
            continue
        active.add(nid)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in active:
                raise _Limit(problem="a recursive alias: an anchor (&name) is used (*name) inside itself",
                             problem_mark=child.start_mark)
            if id(child) not in size:
                stack.append((child, False))


def parse_yaml(text: str):
    """The YAML document, or FileProblem with the line and column of the first problem."""
    loader = None
    try:
        loader = LimitedLoader(text)  # the reader refuses unprintable characters already here
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise FileProblem(_yaml_problem(e)) from None
    except RecursionError:  # not reachable with MAX_DEPTH, kept so that nothing escapes
        raise FileProblem("nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.reader.ReaderError):
        return (f"character #x{e.character:04x} at position {e.position} is not allowed in YAML"
                if isinstance(e.character, int) else "the file is not valid text")
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or "invalid YAML"
    context = getattr(e, "context", None)
    if context and context not in problem and getattr(e, "problem", None):
        problem = f"{problem} ({context})"
    return f"{where}{problem}"


def read_yaml(path: str | os.PathLike):
    return parse_yaml(read_text(path))
