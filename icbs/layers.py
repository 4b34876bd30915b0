"""Which layers of a model are pruned.

:func:`find_prunable` picks the ``nn.Linear`` modules of a model by name patterns, leaving out the output
heads (:func:`output_heads`) unless an ``include`` pattern names them; :func:`check_layers` validates a
user-given ``{name: module}`` mapping before any work starts. :func:`block_list` finds a model's repeated
blocks (the transformer layers of an ``nn.ModuleList``) and :func:`group_by_block` groups the pruned layers
by the block they sit in: the sequential SparseGPT/ALPS driver and the OWL allocation share that rule. A
layer's weight is viewed as ``(n_out, n_in)``; flat indices are row-major.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

from torch import nn

__all__ = ["HEAD_NAMES", "output_heads", "find_prunable", "check_layers", "block_list", "block_prefixes",
           "group_by_block"]

#: Last name parts of ``nn.Linear`` modules that are output heads (Hugging Face's names).
HEAD_NAMES = ("lm_head", "classifier", "head", "score")


def output_heads(model: nn.Module, *, last_linear: bool = False) -> set[str]:
    """Module names of the output heads of ``model``: the ``nn.Linear`` layers left dense by default.

    A head is an ``nn.Linear`` whose last name part is in :data:`HEAD_NAMES`. A classifier's adapter
    passes ``last_linear=True``: when no layer has such a name, the last ``nn.Linear`` in module order
    (the layer that produces the logits of a plain classifier, e.g. ``fc3`` of the MNIST MLP) is the head.
    """
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    named = {name for name in linear if name.split(".")[-1] in HEAD_NAMES}
    if named or not last_linear or not linear:
        return named
    return {linear[-1]}


def _compile(patterns: Sequence[str], key: str) -> list[re.Pattern[str]]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"'{key}' should hold regular-expression strings; got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"'{key}' pattern {pattern!r} is not a valid regular expression: {err}") from err
    return compiled


def find_prunable(
    model: nn.Module,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    heads: Collection[str] | None = None,
) -> dict[str, nn.Module]:
    """Return the prunable ``nn.Linear`` layers of ``model``.

    A layer is kept when its module name matches (``re.search``) one of ``include`` (empty = every
    layer) and none of ``exclude``. Output heads are left out unless an ``include`` pattern names them.

    Args:
        model: the model.
        include: regular expressions; empty means all ``nn.Linear`` layers.
        exclude: regular expressions of layers to leave dense.
        heads: module names of the output heads; default :func:`output_heads` (heads by name).

    Returns:
        ``{module_name: module}`` in the model's module order.

    Raises:
        ValueError: a pattern is invalid or matches no ``nn.Linear`` layer, or nothing is left.
    """
    include_re = _compile(include, "model.include")
    exclude_re = _compile(exclude, "model.exclude")
    linear = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for key, patterns in (("model.include", include_re), ("model.exclude", exclude_re)):
        for pattern in patterns:
            if not any(pattern.search(name) for name, _ in linear):
                raise ValueError(
                    f"'{key}' pattern {pattern.pattern!r} matches no nn.Linear layer; "
                    f"layers are: {', '.join(name for name, _ in linear[:20]) or '(none)'}"
                )
    head_names = output_heads(model) if heads is None else set(heads)
    chosen: dict[str, nn.Module] = {}
    for name, module in linear:
        explicitly = any(pattern.search(name) for pattern in include_re)
        if include_re and not explicitly:
            continue
        if any(pattern.search(name) for pattern in exclude_re):
            continue
        if name in head_names and not explicitly:
            continue
        chosen[name] = module
    if not chosen:
        raise ValueError("no prunable nn.Linear layer is left after 'model.include'/'model.exclude'")
    return chosen


def check_layers(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Validate a ``{name: module}`` mapping of layers to prune.

    Args:
        model: the model the layers belong to.
        layers: the layers; each must be an ``nn.Linear`` inside ``model`` with a floating weight.

    Returns:
        A plain dict copy of ``layers``.

    Raises:
        TypeError: ``layers`` is not a mapping, or a layer is not an ``nn.Linear``.
        ValueError: the mapping is empty, a layer is not part of ``model`` or appears twice.
    """
    if not isinstance(layers, Mapping):
        raise TypeError(f"'layers' should be a mapping of name -> nn.Linear; got {type(layers).__name__}")
    if not layers:
        raise ValueError("'layers' should name at least one layer; got an empty mapping")
    own = {id(module) for module in model.modules()}
    seen: set[int] = set()
    for name, module in layers.items():
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"layer {name!r} is not prunable: 'layers' should hold nn.Linear modules; got {type(module).__name__}"
            )
        if id(module) not in own:
            raise ValueError(f"layer {name!r} in 'layers' is not a submodule of the model")
        if id(module) in seen:
            raise ValueError(f"layer {name!r} in 'layers' appears twice under different names")
        if not module.weight.is_floating_point():
            raise TypeError(f"layer {name!r} has a non-floating weight ({module.weight.dtype}); it cannot be pruned")
        seen.add(id(module))
    return dict(layers)


def block_prefixes(list_name: str, n_blocks: int) -> tuple[str, ...]:
    """Name prefix of every block of the ``nn.ModuleList`` named ``list_name``: ``"model.layers.3."``
    (``"3."`` when the model itself is the list)."""
    return tuple(f"{list_name}.{i}." if list_name else f"{i}." for i in range(n_blocks))


def block_list(model: nn.Module, layers: Collection[str]) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: the ``nn.ModuleList`` whose children hold the most of the layer names
    ``layers`` (the outermost on ties), as ``(its name, the list)``; ``None`` when no list holds any."""
    best: tuple[str, nn.ModuleList] | None = None
    best_count = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        prefixes = block_prefixes(name, len(module))
        count = sum(1 for layer in layers if layer.startswith(prefixes))
        if count > best_count:
            best, best_count = (name, module), count
    return best


def group_by_block(model: nn.Module, layers: Collection[str]) -> list[list[str]]:
    """The layer names grouped by the block of :func:`block_list` they sit in; a layer outside every block
    (an input projection, an included head, any layer of a model without blocks) is a group of its own.

    Groups and the names inside them keep the order of ``layers``.
    """
    found = block_list(model, layers)
    prefixes = block_prefixes(found[0], len(found[1])) if found is not None else ()
    groups: dict[str, list[str]] = {}
    for name in layers:
        key = next((prefix for prefix in prefixes if name.startswith(prefix)), name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())
