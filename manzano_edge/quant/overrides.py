"""Mixed precision: `--keep-float lm_head,layers.0,graph:vae_decoder`.

- `graph:NAME` keeps a whole graph in float (it is exported fp32, recorded as such).
- any other item names a module (layer or block) inside a graph: it matches a module whose
  qualified name equals it, ends with `.ITEM`, or contains `.ITEM.` / starts with `ITEM.`
  (so `lm_head` matches `decoder.lm_head`, `layers.0` a whole block). Every layer item must
  match in at least one exported graph, so a typo fails instead of quantizing everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from manzano_edge.errors import UserError

# Graphs with Linear layers, which `sensitivity` ranks layer by layer to propose a --keep-float;
# for the others (embed_tokens, the all-conv VAE decoder) the advice is graph:NAME.
LAYERED_GRAPHS = ("tokenizer", "decoder", "code_features", "dit")


@dataclass(frozen=True)
class KeepFloat:
    graphs: frozenset[str] = frozenset()
    layers: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"graphs": sorted(self.graphs), "layers": list(self.layers)}

    @property
    def empty(self) -> bool:
        return not self.graphs and not self.layers


def parse_keep_float(value: str | None, graph_names: list[str]) -> KeepFloat:
    if not value:
        return KeepFloat()
    graphs, layers = set(), []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        if item.startswith("graph:"):
            name = item[len("graph:"):]
            if name not in graph_names:
                raise UserError(f"--keep-float: unknown graph '{name}'; choose from {', '.join(graph_names)}")
            graphs.add(name)
        else:
            layers.append(item)
    return KeepFloat(frozenset(graphs), tuple(dict.fromkeys(layers)))


def matches(fqn: str, item: str) -> bool:
    """Whether module `fqn` is selected by the --keep-float layer item `item`."""
    return fqn == item or fqn.endswith("." + item) or fqn.startswith(item + ".") or f".{item}." in f".{fqn}."


def quantizable_modules(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))]


@dataclass
class Resolved:
    """Concrete module names (inside one graph's module) to keep in float."""

    modules: list[str] = field(default_factory=list)
    matched_items: set[str] = field(default_factory=set)


def resolve_layers(module: nn.Module, keep: KeepFloat) -> Resolved:
    """The Linear/Conv modules of `module` that the layer items select."""
    out = Resolved()
    for name in quantizable_modules(module):
        hits = [item for item in keep.layers if matches(name, item)]
        if hits:
            out.modules.append(name)
            out.matched_items.update(hits)
    return out


def check_all_matched(keep: KeepFloat, matched: set[str], graphs: list[str]) -> None:
    missing = [item for item in keep.layers if item not in matched]
    if missing:
        raise UserError(f"--keep-float: no Linear/Conv layer named '{missing[0]}' in graphs {', '.join(graphs)}; "
                        "use a module name such as lm_head or layers.0, or graph:NAME")
