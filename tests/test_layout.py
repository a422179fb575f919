# -*- test-case-name: tests.test_layout -*-
"""The code base's own habits, checked: each module names the tests that exercise it, and no test module
leans on another (what tests share lives in tests/support/)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
HEADER = re.compile(r"^# -\*- test-case-name: (?P<names>[\w.]+(?:, [\w.]+)*) -\*-$")


def source_modules() -> list[Path]:
    """Every module of the package and of the twistd plugin directory."""
    return sorted([*ROOT.joinpath("mailrelay").rglob("*.py"), *ROOT.joinpath("twisted", "plugins").glob("*.py")])


def test_modules() -> list[Path]:
    return sorted(ROOT.joinpath("tests").glob("test_*.py"))


def module_path(name: str) -> Path:
    return ROOT.joinpath(*name.split(".")).with_suffix(".py")


def imported_test_modules(source: str) -> list[str]:
    """The tests.test_* modules a module's source imports, wherever the import statement is."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("tests.test_")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("tests.test_"):
                found.append(node.module)
            elif node.module == "tests":
                found += [f"tests.{a.name}" for a in node.names if a.name.startswith("test_")]
        elif isinstance(node, ast.ImportFrom) and node.level and (node.module or "").startswith("test_"):
            found.append(f"tests.{node.module}")
        elif isinstance(node, ast.ImportFrom) and node.level:
            found += [f"tests.{a.name}" for a in node.names if a.name.startswith("test_")]
    return found


class TestCaseNameHeaderTests(unittest.TestCase):
    def test_every_module_names_its_tests_on_its_first_line(self) -> None:
        missing = []
        for path in source_modules():
            first = path.read_text().split("\n", 1)[0]
            if not HEADER.match(first):
                missing.append(str(path.relative_to(ROOT)))
        self.assertEqual(missing, [], "modules without '# -*- test-case-name: tests.test_x -*-' on line 1")

    def test_the_named_test_modules_exist(self) -> None:
        unknown = []
        for path in source_modules():
            match = HEADER.match(path.read_text().split("\n", 1)[0])
            for name in match["names"].split(", ") if match else ():
                if not name.startswith("tests.test_") or not module_path(name).is_file():
                    unknown.append(f"{path.relative_to(ROOT)}: {name}")
        self.assertEqual(unknown, [])

    def test_the_header_pattern_refuses_what_trial_could_not_use(self) -> None:
        self.assertTrue(HEADER.match("# -*- test-case-name: tests.test_spool, tests.test_spool_crash -*-"))
        for bad in ('"""A docstring first."""', "# -*- test-case-name: -*-",
                    "# -*- test-case-name: tests.test_a,tests.test_b -*-", "# test-case-name: tests.test_a"):
            self.assertIsNone(HEADER.match(bad), bad)


class TestModuleIndependenceTests(unittest.TestCase):
    def test_no_test_module_imports_another(self) -> None:
        offenders = []
        for path in test_modules() + sorted(ROOT.joinpath("tests", "support").glob("*.py")):
            for name in imported_test_modules(path.read_text()):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
        self.assertEqual(offenders, [], "shared fakes and helpers belong in tests/support/")

    def test_every_form_of_the_import_is_seen(self) -> None:
        source = ("import tests.test_a\nfrom tests.test_b import X\nfrom tests import test_c as c\n"
                  "from . import test_d\nfrom .test_e import Y\n"
                  "def f():\n    from tests.test_f import Z\n"
                  "from tests.support.fakes import FakeHop\nimport tests.support.ports\n")
        self.assertEqual(imported_test_modules(source),
                         ["tests.test_a", "tests.test_b", "tests.test_c", "tests.test_d", "tests.test_e",
                          "tests.test_f"])
