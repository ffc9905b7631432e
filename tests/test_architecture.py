"""The layering of docs/architecture.md, checked on the source: arrows point down.

- Every module belongs to one layer of ``LAYERS`` (the diagram of docs/architecture.md, top to
  bottom), and every import, at module level or inside a function, points to its own layer or
  one below: ``data/`` never imports ``feedback/``, nothing below the CLI imports it, ``evals/``
  never imports the pipeline, its rounds or ``compare``.
- ``rl/`` is pure maths: it imports torch, numpy and the standard library, nothing of preflab
  outside ``rl/``.
- No stage imports another stage or the CLI (stages share what lives below them).
- The import graph of preflab's modules (module-level imports) has no cycle.
"""

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "preflab"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # `if TYPE_CHECKING:` and try/except blocks at module level count too
        nodes = [n for top in tree.body for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef, ast.ClassDef))]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from preflab import models`
    return out


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def preflab_imports(path: Path, top_level_only: bool = False) -> set[str]:
    return {m for m in imports(path, top_level_only) if m in MODULES}


def test_rl_imports_only_torch_numpy_and_the_standard_library():
    allowed = {"torch", "numpy", "__future__"} | set(sys.stdlib_module_names)
    for path in (SRC / "rl").glob("*.py"):
        for name in imports(path, top_level_only=False):
            root = name.split(".")[0]
            if root == "preflab":
                assert name.startswith("preflab.rl"), f"{path.name} imports {name}"
            else:
                assert root in allowed, f"rl/{path.name} imports {name}"


def test_no_stage_imports_another_stage_or_the_cli():
    for path in (SRC / "stages").glob("*.py"):
        if path.name == "__init__.py":
            continue
        me = module_name(path)
        for name in preflab_imports(path):
            assert name != "preflab.cli", f"{me} imports the CLI"
            assert not (name.startswith("preflab.stages.") and name != me), f"{me} imports {name}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "all-imports"])
def test_the_import_graph_has_no_cycle(top_level_only):
    graph = {}
    for name, path in MODULES.items():
        # A package's __init__ re-exporting its own modules is not a cycle of the layering.
        deps = {d for d in preflab_imports(path, top_level_only) if d != name and not name.startswith(d + ".")
                and not (path.name == "__init__.py" and d.startswith(name + "."))}
        graph[name] = {d for d in deps if not d.startswith(name + ".")}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# -- layers -----------------------------------------------------------------------------------

# docs/architecture.md's diagram, top to bottom: a module may import its own layer and the ones
# below it. An entry names a module or a package (every module under it); the longest match wins.
LAYERS: list[tuple[str, ...]] = [
    ("cli", "__init__"),                                    # the entry points: `preflab`, the Python API
    ("pipeline", "rounds", "compare", "release"),           # the jobs: the main job, its rounds, comparisons; releases
    ("stages", "annotate"),                                 # the trainers; the labeling app
    ("loop", "selection", "rl_update", "dpo_update", "evals"),  # what trainers share; evaluation
    ("scoring", "rewards"),                                 # scoring forward passes; reward functions
    ("feedback",),                                          # gold judge, labelers, agreement, the store
    ("rollout", "generation"),                              # sampling
    ("models", "lm", "reward_heads", "run", "trackers"),    # loading models, losses, run directories
    ("data",),                                              # files, chat rendering, rankings, the task suite
    ("config", "registry", "optim", "distributed", "command_group", "constraints", "metric_keys",
     "http_body", "errors"),                                # the base every layer uses
    ("rl",),                                                # the maths: pure functions
]


def layer_of(module: str) -> int:
    """The index in ``LAYERS`` of ``preflab.<module>`` (0 is the top); KeyError if it has none."""
    rel = module.removeprefix("preflab").removeprefix(".") or "__init__"
    best = None
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if (rel == entry or rel.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    if best is None:
        raise KeyError(f"preflab.{rel} is in no layer of LAYERS (add it where docs/architecture.md draws it)")
    return best[0]


def climbing_imports(graph: dict[str, set[str]], layer=layer_of) -> list[str]:
    """``importer -> imported`` for every import that points to a higher layer."""
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer(b) < layer(a))


def import_graph() -> dict[str, set[str]]:
    """Every import of every module (inside functions too), without the root package itself
    (``from preflab import models`` imports ``preflab.models``; the root is a given)."""
    return {name: {d for d in preflab_imports(path) if d != "preflab" and d != name} for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)  # raises, naming the module


def test_no_import_climbs_a_layer():
    climbing = climbing_imports(import_graph())
    assert not climbing, "imports that point up (docs/architecture.md, Layers):\n  " + "\n  ".join(climbing)


@pytest.mark.parametrize("lower,upper", [
    ("preflab.data", "preflab.feedback"),      # the suite and the readers sit below the store and the judge
    ("preflab.evals", "preflab.compare"),      # evaluation is below the jobs that run it
    ("preflab.evals", "preflab.pipeline"),
    ("preflab.evals", "preflab.rounds"),
])
def test_named_arrows_point_down(lower, upper):
    assert layer_of(lower) > layer_of(upper)
    offenders = [f"{a} -> {b}" for a, deps in import_graph().items() if a == lower or a.startswith(lower + ".")
                 for b in deps if b == upper or b.startswith(upper + ".")]
    assert not offenders, offenders


def test_nothing_below_the_cli_imports_it():
    importers = sorted(a for a, deps in import_graph().items() if "preflab.cli" in deps)
    assert importers == [], f"{importers} import preflab.cli (use preflab.command_group)"


def test_the_checker_sees_an_arrow_that_climbs():
    graph = {"preflab.data.suite.schema": {"preflab.feedback.constraints", "preflab.errors"},
             "preflab.evals.audit": {"preflab.compare"}, "preflab.stages.rl": {"preflab.rl_update"}}
    assert climbing_imports(graph) == ["preflab.data.suite.schema -> preflab.feedback.constraints",
                                       "preflab.evals.audit -> preflab.compare"]
    assert layer_of("preflab") == layer_of("preflab.cli") == 0 and layer_of("preflab.rl.kl") == len(LAYERS) - 1
    with pytest.raises(KeyError, match="preflab.newthing"):
        layer_of("preflab.newthing")
