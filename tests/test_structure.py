"""The shape of the package, read from its source with `ast`: no import cycles (counting the imports made
inside functions too), and the stages import only what comes before them on the message's journey
(config → server → spool → queue → outbound → dsn → events: the queue decides what to send when and
hands it to outbound, which sends it; webhooks are told of delivery's outcomes), never
what comes after; config imports no stage. The composition root (mailrelay.wiring, with
mailrelay.service and the delivery process's entry point) is imported by nothing but the root and the
command line: the stages are handed what they need."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

from twisted.trial import unittest

import mailrelay

PACKAGE = Path(mailrelay.__file__).resolve().parent
JOURNEY = ("config", "server", "spool", "queue", "outbound", "dsn", "events")
# The composition root: the modules that know every stage. Only they (and the command line) may import them.
ROOT = ("mailrelay.wiring", "mailrelay.service", "mailrelay.delivery_main")
# Called by the root alone: what to build from `[cluster]`.
ROOT_ONLY = ROOT + ("mailrelay.cluster.wiring",)


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("mailrelay",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every mailrelay module `name` imports, at module level or inside a function; not those only a
    type checker sees (`if TYPE_CHECKING:`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def visit(nodes: list) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            else:
                targets = []
            for target in targets:
                module = owner(target)
                if module is not None and module != name:
                    found.add(module)
            visit([child for child in ast.iter_child_nodes(node)
                   if isinstance(child, (ast.stmt, ast.excepthandler))])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


@functools.cache
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def in_root(module: str) -> bool:
    return module in ROOT or module == "mailrelay.cli" or module.startswith("mailrelay.cli.")


def root_imports(edges: dict[str, set[str]]) -> list[str]:
    """`module -> target` for every import of a root module (or of cluster.wiring) from outside the root."""
    return sorted(f"{module} -> {target}" for module, targets in edges.items() if not in_root(module)
                  for target in targets if target in ROOT_ONLY)


class StructureTests(unittest.TestCase):
    def setUp(self):
        self.edges = graph()

    def test_the_graph_sees_imports_inside_functions(self):
        # wiring.py builds the delivery side lazily; a reader that missed function-level imports
        # would find no cycle anywhere and prove nothing.
        self.assertIn("mailrelay.queue.scheduler", self.edges["mailrelay.wiring"])
        self.assertIn("mailrelay.config", self.edges["mailrelay.server.policy"])

    def test_no_import_cycles(self):
        self.assertEqual(cycles(self.edges), [])

    def test_the_cycle_finder_finds_a_cycle(self):
        self.assertEqual(cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}), [["a", "b", "c"]])

    def test_a_stage_imports_nothing_from_a_later_stage(self):
        later = []
        for module, targets in self.edges.items():
            if stage(module) not in JOURNEY:
                continue
            for target in targets:
                if stage(target) in JOURNEY and JOURNEY.index(stage(target)) > JOURNEY.index(stage(module)):
                    later.append(f"{module} -> {target}")
        self.assertEqual(later, [])

    def test_only_the_root_imports_the_root(self):
        # The stages get what they need handed in; the root (and the command line) alone assembles them.
        self.assertEqual(root_imports(self.edges), [])

    def test_the_root_is_where_the_assembly_happens(self):
        for module in ROOT:
            self.assertIn(module, self.edges)
        self.assertIn("mailrelay.wiring", self.edges["mailrelay.service"])
        self.assertIn("mailrelay.wiring", self.edges["mailrelay.delivery_main"])
        self.assertIn("mailrelay.cluster.wiring", self.edges["mailrelay.wiring"])
        self.assertIn("mailrelay.queue.worker", self.edges["mailrelay.wiring"])

    def test_the_delivery_stages_never_import_the_root(self):
        """Not directly, and not through anything they import: the delivery process's service and its
        parent-side stand-in (queue.process) know no root module, nor does the outbound side."""
        delivery = [name for name in self.edges if stage(name) in ("queue", "outbound")]
        self.assertIn("mailrelay.queue.worker", delivery)
        self.assertIn("mailrelay.queue.process", delivery)
        for name in delivery:
            seen, todo = set(), [name]
            while todo:
                module = todo.pop()
                if module in seen:
                    continue
                seen.add(module)
                todo.extend(self.edges.get(module, ()))
            self.assertEqual(sorted(seen & set(ROOT_ONLY)), [], name)

    def test_the_root_check_finds_a_stage_importing_the_root(self):
        edges = {"mailrelay.queue.worker": {"mailrelay.service"}, "mailrelay.wiring": {"mailrelay.queue.worker"},
                 "mailrelay.cli.queue": {"mailrelay.wiring"}, "mailrelay.server.policy": {"mailrelay.cluster.wiring"}}
        self.assertEqual(root_imports(edges), ["mailrelay.queue.worker -> mailrelay.service",
                                               "mailrelay.server.policy -> mailrelay.cluster.wiring"])
