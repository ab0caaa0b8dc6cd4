"""The packages form layers: every import (module level or inside a function) goes to the importer's own layer or a
lower one, never up. The order, bottom to top, is the README's ("How it is built"):

    base (errors, config, compat, process_lifetime, hf_model, serving) -> distributed -> model -> data -> hf
    -> checkpoint -> engines -> training -> vqa -> commands (cli, demo, commands) -> benchmarks -> data_prep, launch

`hf_model` is the exported HF model's remote code, which imports nothing of megavictor, so the models below can
share its drop convention; `serving` is the vLLM plugin, which imports only vLLM (it runs in the serving venv);
`data_prep` and `launch` import megavictor and are never imported by it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("megavictor", "data_prep", "launch")
LAYERS: list[tuple[str, ...]] = [
    ("megavictor.errors", "megavictor.config", "megavictor.compat", "megavictor.process_lifetime",
     "megavictor.hf_model", "megavictor.serving"),
    ("megavictor.distributed",),
    ("megavictor.model",),
    ("megavictor.data",),
    ("megavictor.hf",),
    ("megavictor.checkpoint",),
    ("megavictor.engines",),
    ("megavictor.training",),
    ("megavictor.vqa", "megavictor.kv_cache"),
    ("megavictor", "megavictor.__main__", "megavictor.cli", "megavictor.demo", "megavictor.commands"),
    ("megavictor.benchmarks",),
    ("data_prep", "launch"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """Each project module -> the project modules it imports anywhere in its code (absolute or relative)."""
    modules = {module_name(p): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    imports: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package, `level - 1` packages up
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        imports[name] = {m for m in found if m.split(".")[0] in PACKAGES}
    return imports


def layer_of(module: str) -> int:
    """The layer of the longest layer entry that `module` is or lies inside."""
    best, index = -1, None
    for i, names in enumerate(LAYERS):
        for entry in names:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > best:
                best, index = len(entry), i
    assert index is not None, f"{module} is in no layer: add it to LAYERS (and to the README's order)"
    return index


def violations(imports: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
                  for src, dsts in imports.items() for dst in dsts if layer_of(dst) > layer_of(src))


def test_every_import_goes_down_the_layers() -> None:
    imports = project_imports()
    assert len(imports) > 80, "the scan found too few modules"
    assert violations(imports) == []


def test_an_import_against_the_order_is_caught() -> None:
    imports = project_imports()
    imports["megavictor.model.vlm"] = imports["megavictor.model.vlm"] | {"megavictor.training.loop"}
    imports["megavictor.demo"] = imports["megavictor.demo"] | {"data_prep.cli"}
    assert violations(imports) == [
        "megavictor.demo (layer 9) imports data_prep.cli (layer 11)",
        "megavictor.model.vlm (layer 2) imports megavictor.training.loop (layer 7)",
    ]
