"""The import rules of docs/design.md, read from the source: a3jax's parts import only from earlier
tiers, and never another module's private names."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "a3jax")

# docs/design.md, "What each part owns and what it may import".
TIERS = [
    {"config", "distributed", "fs", "sandbox"},
    {"masks", "layout", "sharding"},
    {"model"},
    {"objectives"},
    {"data"},
    {"checkpoint"},
    {"convert"},
    {"score"},
    {"train", "decode"},
    {"eval", "posttrain", "serve"},
    {"demo_tasks"},
    {"demo", "compile", "show_masks", "bench_cli", "config_reference", "cli"},
    {"__main__", "cli_reference"},
]
TIER = {part: i for i, parts in enumerate(TIERS) for part in parts}
# The one upward import docs/design.md allows: config validates train.objective against the objective
# table, which builds on the model (which reads config); config imports it inside the function.
UPWARD = {("config", "objectives")}


def _modules():
    for root, _, files in os.walk(PKG):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                yield path, rel


def _imports(path, rel):
    """(imported module as a dotted list, imported names) of every a3jax import in the file."""
    is_pkg = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "a3jax":
                    yield a.name.split("."), []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = rel[:len(rel) - node.level + (1 if is_pkg else 0)]
                mod = base + (node.module.split(".") if node.module else [])
            else:
                mod = (node.module or "").split(".")
            if mod[0] == "a3jax":
                yield mod, [a.name for a in node.names]


def _part(mod):
    """The top-level part of a3jax a dotted module belongs to ('a3jax' alone for the package root)."""
    return mod[1] if len(mod) > 1 else None


def test_every_part_has_a_tier():
    parts = {_part(rel) for _, rel in _modules()} - {None}
    assert parts <= set(TIER), f"parts with no tier in docs/design.md: {sorted(parts - set(TIER))}"


def test_imports_go_to_earlier_tiers_only():
    bad = []
    for path, rel in _modules():
        here = _part(rel)
        if here is None:
            continue
        for mod, names in _imports(path, rel):
            targets = [_part(mod)] if _part(mod) else names  # `from a3jax import masks`
            for t in targets:
                if t in TIER and t != here and TIER[t] >= TIER[here] and (here, t) not in UPWARD:
                    bad.append(f"{'/'.join(rel)} imports a3jax.{t} (tier {TIER[t]} >= {TIER[here]})")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for path, rel in _modules():
        for mod, names in _imports(path, rel):
            if any(p.startswith("_") and p != "__main__" for p in mod):
                bad.append(f"{'/'.join(rel)} imports private module {'.'.join(mod)}")
            bad += [f"{'/'.join(rel)} imports {n} from {'.'.join(mod)}" for n in names
                    if n.startswith("_") and mod != rel]
    assert not bad, "\n".join(bad)
