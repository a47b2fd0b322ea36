"""The shape of the code (DESIGN.md): no import circles inside compress/, no module importing another's
private names. Read from the source with ast, imports inside functions included."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "compress"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) of every import in the file, relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] == "compress":
                out.append((base, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "compress"]
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        for target, names in _imports(path):
            for name in names:  # "from compress import kernels" imports a module
                if f"{target}.{name}" in modules:
                    graph[m].add(f"{target}.{name}")
            if target in modules:
                graph[m].add(target)
        graph[m].discard(m)
    return graph


def _is_package_root(importer: str, target: str) -> bool:
    """A package's __init__ re-exporting its own modules is not a circle through them."""
    return importer.startswith(target + ".") or target.startswith(importer + ".")


def test_no_import_circles():
    graph = _graph()
    edges = {m: {t for t in ts if not _is_package_root(m, t)} for m, ts in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for target, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            offenders += [f"{_module_name(path)} imports {target}.{n}" for n in private]
    assert not offenders, offenders


def test_a_new_pass_is_one_class():
    """DESIGN.md's promise: a pass written in one place (here) is found by recipes, gets exactly the statistics
    its Requirements declare, and replaces layers, with no change to the pipeline."""
    from typing import Literal

    import torch
    import transformers

    from compress.formats import quantize_rtn
    from compress.modules import CompressedLinear
    from compress.passes.base import Pass, PassConfig, Requirements, current_weight
    from compress.passes.registry import PASSES, register
    from compress.pipeline import plan, run_passes
    from compress.quant import QuantSpec
    from compress.recipe import parse_recipe

    seen = {}

    class ProbeConfig(PassConfig):
        type: Literal["test-probe"] = "test-probe"
        bits: int = 4

    @register
    class Probe(Pass):
        """Round to nearest, recording the statistics it was handed (a test pass)."""

        name, stage, Config = "test-probe", "quantize", ProbeConfig

        def requirements(self):
            return Requirements(stats=frozenset({"sq_sum"}))

        def compress_layer(self, name, module, stats, cfg):
            seen[name] = stats
            return quantize_rtn(current_weight(module), QuantSpec(cfg.bits, 32)), {"probe": True}

    try:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        recipe = parse_recipe({"passes": [{"type": "test-probe", "bits": 3, "targets": ["*.mlp.*"]}]})
        result = run_passes(model, plan(recipe.passes), torch.randint(0, 96, (2, 16)), "cpu")  # shapes only
        assert set(seen) == {f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")}
        assert all(s.sq_sum is not None and s.hessian is None and s.tokens == 32 for s in seen.values())
        assert isinstance(model.model.layers[1].mlp.down_proj, CompressedLinear)
        assert result.layers["model.layers.0.mlp.up_proj"].notes == {"probe": True}
    finally:
        PASSES.pop("test-probe", None)
