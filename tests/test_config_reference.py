"""docs/config.md and the config reader cannot drift apart.

The reader refuses every key nobody asked for (`_Reader.close`), so the keys it accepts are exactly the
keys its getters ask for.  `walk()` loads SHAPE (one of every table) with the getters recorded and
gets every accepted key path ("limits.max_message_size", "permit.networks", "transports.NAME.host"),
the allowed values of every choice, and whether the walk reached every table.  docs/config.md is read
as its tables: under "## Keys", a "### `[section]`" heading and one "| `key` | default | meaning |"
row per key; under "## Not supported yet", one row per refused key or table.  Checked: the two key
sets are equal, every allowed value is in its row, a default written as one TOML value is the default
(writing it changes nothing), and every key not supported yet is refused.

Adding a key: one row in docs/config.md under its section; the walk finds the key by itself.  Adding a
new [[array]] table or a table read only when present: one entry in SHAPE (the test says so).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import re
import tempfile
import tomllib
from pathlib import Path

from twisted.trial import unittest

from mailrelay.config import ConfigError, load, reader
from mailrelay.dkim import keys

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "config.md"

# One of every table whose keys are read only when the table is there: arrays of tables, named tables
# and sub-tables the sections look for with has().  Values are TOML text; only what each table requires.
SHAPE: dict[str, dict[str, str]] = {
    "": {},
    "auth.ldap": {"url": '"ldap://127.0.0.1"', "bind_dn": '"uid={user},dc=example,dc=org"'},
    "transports.NAME": {"host": '"smtp.example"'},
    "listen": {"kind": '"relay"'},
    "permit": {"users": '["*"]'},
    "dkim.key": {"domain": '"example.org"', "selector": '"s1"', "key_file": '"dkim.pem"'},
    "route": {"transport": '"NAME"'},
    "webhook": {"url": '"https://hooks.example.org/mail"'},
    "throttle": {},
}
ARRAYS = {"listen", "permit", "dkim.key", "route", "webhook", "throttle"}


def normal(path: str) -> str:
    return re.sub(r"\[\d+\]", "", path)


def render(shape: dict[str, dict[str, str]], arrays: set[str] = ARRAYS) -> str:
    """TOML text for `shape`: top-level keys, then plain tables (parents first), then arrays of tables."""
    lines = [f"{k} = {v}" for k, v in shape.get("", {}).items()]
    plain = sorted(s for s in shape if s and s not in arrays)
    for section in plain + [s for s in shape if s in arrays]:
        lines.append(f"[[{section}]]" if section in arrays else f"[{section}]")
        lines += [f"{k} = {v}" for k, v in shape[section].items()]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Walk:
    keys: set[str]                    # every leaf key path the reader accepts
    choices: dict[str, tuple]         # key path -> allowed values
    unwalked: set[str]                # tables the reader looks for that SHAPE lacks


def write_shape(directory: Path, shape: dict[str, dict[str, str]], name: str = "tap.conf",
                arrays: set[str] = ARRAYS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pem = directory / "dkim.pem"
    if not pem.exists():
        pem.write_bytes(keys.private_pem(keys.generate("ed25519", 0)))
    path = directory / name
    path.write_text(render(shape, arrays))
    return path


@functools.cache
def walk() -> Walk:
    """What the reader asks for when it loads SHAPE (computed once per test run)."""
    asked, containers, choices, probed, absent_arrays = set(), set(), {}, set(), set()
    get, table, tables, choice, has = (reader._Reader.get, reader._Reader.table, reader._Reader.tables,
                                       reader._Reader.choice, reader._Reader.has)

    def get_(self, key, *args):
        asked.add(normal(self.where(key)))
        return get(self, key, *args)

    def table_(self, key):
        containers.add(normal(self.where(key)))
        return table(self, key)

    def tables_(self, key):
        containers.add(normal(self.where(key)))
        if key not in self.data:
            absent_arrays.add(normal(self.where(key)))
        return tables(self, key)

    def choice_(self, key, default, allowed):
        choices[normal(self.where(key))] = allowed
        return choice(self, key, default, allowed)

    def has_(self, key):
        probed.add(normal(self.where(key)))
        return has(self, key)

    patched = {"get": get_, "table": table_, "tables": tables_, "choice": choice_, "has": has_}
    saved = {name: getattr(reader._Reader, name) for name in patched}
    try:
        for name, function in patched.items():
            setattr(reader._Reader, name, function)
        with tempfile.TemporaryDirectory() as directory:
            load(write_shape(Path(directory), SHAPE))
    finally:
        for name, function in saved.items():
            setattr(reader._Reader, name, function)
    # A key looked for with has() and never asked for is a table read only when present (auth.ldap).
    return Walk(keys=asked - containers, choices=choices, unwalked=absent_arrays | (probed - asked))


@dataclasses.dataclass
class Reference:
    rows: dict[str, list[str]]        # key path -> [key cell, default cell, meaning cell]
    sections: dict[str, str]          # key path -> the heading it is under, as written
    unsupported: list[str]            # first cells of "Not supported yet"


def read_reference(text: str) -> Reference:
    rows, sections, unsupported = {}, {}, []
    part, section, heading = None, None, None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("## "):
            part, section = line[3:].strip(), None
        elif line.startswith("### "):
            heading = line[4:].strip()
            match = re.fullmatch(r"`\[\[?([^\]`]+)\]\]?`", heading)
            section = match.group(1) if match else ("" if heading == "Top level" else None)
        elif line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            first = cells[0].strip("`")
            if part == "Keys":
                assert section is not None, f"docs/config.md:{number}: a key row outside a `[section]` heading"
                path = f"{section}.{first}" if section else first
                assert path not in rows, f"docs/config.md:{number}: {path} documented twice"
                rows[path], sections[path] = cells, heading
            elif part == "Not supported yet":
                unsupported.append(first)
    return Reference(rows, sections, unsupported)


def literal(cell: str):
    """The TOML value of a default cell that is exactly one `value`, else None ("unset", prose)."""
    match = re.fullmatch(r"`([^`]+)`", cell)
    if match is None:
        return None
    return match.group(1)


def where(path: str) -> str:
    section, _, key = path.rpartition(".")
    heading = "Top level" if not section else f"`[[{section}]]`" if section in ARRAYS else f"`[{section}]`"
    return f"under ### {heading}: | `{key}` | default | meaning |"


class ReferenceMatchesTheReader(unittest.TestCase):
    def setUp(self) -> None:
        self.walk = walk()
        self.reference = read_reference(REFERENCE.read_text())

    def test_the_walk_reaches_every_table(self) -> None:
        self.assertEqual(self.walk.unwalked, set(),
                         "the reader looks for these tables, but SHAPE in this test has none: add one each, "
                         "with the keys it requires")
        self.assertGreater(len(self.walk.keys), 60)

    def test_every_key_the_reader_accepts_is_documented(self) -> None:
        missing = sorted(self.walk.keys - set(self.reference.rows))
        self.assertEqual(missing, [], "accepted by the reader but not in docs/config.md; add a row "
                         + "; ".join(f"{p} {where(p)}" for p in missing))

    def test_every_documented_key_is_accepted(self) -> None:
        extra = sorted(set(self.reference.rows) - self.walk.keys)
        self.assertEqual(extra, [], "documented in docs/config.md as supported, but the reader refuses it")

    def test_every_row_has_a_default_and_a_meaning(self) -> None:
        for path, cells in self.reference.rows.items():
            self.assertEqual(len(cells), 3, path)
            self.assertTrue(cells[1] and cells[2], path)

    def test_every_allowed_value_is_documented(self) -> None:
        for path, allowed in self.walk.choices.items():
            row = " | ".join(self.reference.rows[path])
            for value in allowed:
                self.assertIn(f'"{value}"', row, f"{path}: allowed value \"{value}\" is not in its row")

    def test_every_documented_default_is_the_default(self) -> None:
        directory = Path(self.mktemp()).absolute()
        base = load(write_shape(directory, SHAPE))
        checked = 0
        for path, cells in self.reference.rows.items():
            value = literal(cells[1])
            if value is None:
                continue
            tomllib.loads(f"x = {value}")    # a default written as one `value` must be TOML
            section, _, key = path.rpartition(".")
            shape = copy.deepcopy(SHAPE)
            shape.setdefault(section, {})[key] = value
            explicit = load(write_shape(directory, shape, "explicit.conf"))
            self.assertEqual(dataclasses.replace(explicit, path=base.path), base,
                             f"{path}: writing the documented default {value} changes the configuration")
            checked += 1
        self.assertGreater(checked, 40)

    def test_every_key_not_supported_yet_is_refused(self) -> None:
        # Every row of the table was read (a reader that missed the table would check nothing).
        text = REFERENCE.read_text()
        table = text[text.index("## Not supported yet"):] if "## Not supported yet" in text else ""
        rows = [line for line in table.splitlines() if line.startswith("| `")]
        self.assertEqual(len(self.reference.unsupported), len(rows))
        directory = Path(self.mktemp()).absolute()
        for cell in self.reference.unsupported:
            match = re.fullmatch(r"\[(\[?)([\w.]+)\]?\](?: (\w+)(?: = (.+))?)?", cell)
            self.assertIsNotNone(match, f"cannot read {cell!r} in Not supported yet")
            array, section, key, value = match.groups()
            shape, arrays = copy.deepcopy(SHAPE), set(ARRAYS)
            if key is None:                   # a whole table
                self.assertNotIn(section, shape, cell)
                shape[section] = {"enabled": "true"}
                arrays |= {section} if array else set()
                expected = section
            else:
                shape.setdefault(section, {})[key] = value or "true"
                expected = f"{section}.{key}"
            try:
                load(write_shape(directory, shape, arrays=arrays))
            except ConfigError as e:
                error = e
            else:
                self.fail(f"{cell} is accepted by the reader now: move its row from Not supported yet to its "
                          "section in docs/config.md")
            self.assertEqual(normal(error.key), expected, f"{cell}: {error}")
            if value is None:                 # a refused value (kind = "http") belongs to an accepted key
                self.assertNotIn(expected, self.walk.keys, cell)


class NoPrivatePaths(unittest.TestCase):
    def test_the_repository_points_at_its_own_reference(self) -> None:
        readme = (ROOT / "README.md").read_text()
        configuration = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
        self.assertIn("docs/config.md", configuration)
        examples = [p for p in ROOT.rglob("examples/*") if p.is_file()]
        files = [ROOT / "README.md", ROOT / "tap.conf", *ROOT.glob("docs/*.md"), *examples,
                 *ROOT.glob("mailrelay/**/*.py")]
        for path in files:
            text = path.read_text()
            self.assertNotIn("../shared", text, path)
            self.assertNotIn("shared/spec", text, path)
