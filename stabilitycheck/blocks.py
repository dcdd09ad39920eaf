"""Which modules of a model are its blocks: found (the longest stack of repeated modules, a flat
Sequential's layers, leaf modules with parameters as a last resort), declared by the model
(stability_blocks()) or given, and checked (distinct, all in the model)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeGuard, cast

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from stabilitycheck._validation import article
from stabilitycheck.errors import UsageError
from stabilitycheck.measurement import shown

Blocks = tuple[tuple[str, nn.Module], ...]


def _kind(module: nn.Module) -> type:
    """A module's class, that of the module it wraps where torch.nn.utils.parametrize gave it a class
    of its own (ParametrizedLinear, one per instance: weight_norm, spectral_norm, orthogonal)."""
    kind = type(module)
    return kind.__bases__[0] if parametrize.is_parametrized(module) else kind


def _reparametrizing(model: nn.Module, name: str) -> bool:
    """Whether `name` is a parametrized module's `parametrizations` ModuleDict or inside it (its
    ParametrizationLists compute a weight: no block of the model)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part == "parametrizations":
            owner = model.get_submodule(".".join(parts[:i]))
            if parametrize.is_parametrized(owner):
                return True
    return False


TABLES = (nn.Embedding, nn.EmbeddingBag)
"""Lookup tables: each takes ids, never another block's output, so a list of them is no chain (MarkupLM's
50 xpath tables, MusicGen's codebooks, a tabular model's features side by side read growth 1 on every
seed, the encoder after them unread)."""


def stacks_in(model: nn.Module) -> list[tuple[str, Blocks]]:
    """Outermost ModuleLists/Sequentials of >= 1 modules of one type that own parameters, as the
    modules a forward calls (`_called`: a list of lists of blocks, stages of a model, is its blocks);
    of one whose modules are mostly of one composite type, those (`_mostly`). Not a list of lookup
    tables (TABLES)."""
    found: list[tuple[str, Blocks]] = []
    for name, module in model.named_modules():
        if (
            not isinstance(module, nn.ModuleList | nn.Sequential)
            or _reparametrizing(model, name)
            or len(module) == 0
        ):
            continue
        children = _mostly(_once(_called(name, module)))
        if (
            not children
            or len({_kind(m) for _, m in children}) != 1
            or not any(True for _ in module.parameters())
            or isinstance(children[0][1], TABLES)
        ):
            continue
        if any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
            continue
        found.append((name, children))
    return found


def _mostly(children: Blocks) -> Blocks:
    """`children`, or where they are a stem, three or more blocks of one type of composite module (a
    module with children) and a head (at most one module before the blocks, one after), the blocks
    alone: torchvision's MobileNetV3 `features`, a stem, 11 InvertedResidual blocks and a head, was
    no stack, and the stacks inside two of its blocks were taken as the chain, their sub-layers
    (growth 0.12 where the blocks' is 2.5e-8). Not of stages, containers
    (EfficientNet's and ConvNeXt's) or not (`_staged`): the blocks inside them are the chain; nor of
    leaf layers, which keep their activations between them (Linear, Tanh, Linear, ...: find_blocks'
    layers of a Sequential)."""
    kinds = [_kind(m) for _, m in children]
    start = int(len(kinds) > 1 and kinds[0] is not kinds[1])
    end = len(kinds) - int(len(kinds) > 1 and kinds[-1] is not kinds[-2])
    blocks = children[start:end]
    if (start, end) == (0, len(kinds)) or len(blocks) < 3 or len(set(kinds[start:end])) != 1:
        return children
    module = blocks[0][1]
    if isinstance(module, nn.Sequential | nn.ModuleList) or not any(True for _ in module.children()):
        return children
    return children if all(_staged(m) for _, m in blocks) else blocks


def _staged(module: nn.Module) -> bool:
    """Whether `module` holds a stack of two or more composite blocks with most of its parameters: a
    stage of a class of its own (timm's TinyVitStage: its blocks are the chain, not the stages, which
    read growth 0.293 for 0.186, stage 0 as a stem). Of MobileNet's blocks only some
    do (three conv layers); an Annotated-Transformer layer's two SublayerConnection clones hold its
    norms alone, its attention and feed-forward beside them (taken for a stage, its 12 sublayers were
    the chain, found in a second review)."""
    total = sum(p.numel() for p in module.parameters())
    return any(
        len(pairs) >= 2
        and any(True for _ in pairs[0][1].children())
        and 2 * sum(p.numel() for _, m in pairs for p in m.parameters()) > total
        for _, pairs in stacks_in(module)
    )


def _longest(stack: tuple[str, Blocks]) -> tuple[int, bool]:
    """A stack's rank as the chain: its length, then whether its blocks are not normalisation layers
    (a class named *Norm*). Of two lists of one length, the layers of `x = x + layer(norm(x))` rank
    above the norms, which the first defined won: read on the norms' outputs, every gain was a branch
    input's. Other ties go to the first defined (a deep-supervision model's per-layer heads, which
    no head feeds, beside its layers)."""
    return len(stack[1]), "Norm" not in type(stack[1][0][1]).__name__


def _outweighs(composite: list[tuple[str, Blocks]], leaves: tuple[str, Blocks]) -> bool:
    """Whether stacks of composite blocks, together, hold both more blocks and more parameters than a
    longer stack of leaf layers: stages of blocks beside a few parallel convs (CoaT-lite's three
    depthwise convs in its first attention were the chain, growth 0.466 for the 8 serial blocks'
    0.0875; 12 tanh blocks in 6 stages of 2 beside a stem's 3 Linears read 0.60, stable, for 623),
    not small heads in lists beside a trunk of Linear layers (17 probe heads in two lists beside 16
    layers were taken for them, growth 1 for 399)."""

    def weight(stacks: list[tuple[str, Blocks]]) -> int:
        return sum(p.numel() for _, pairs in stacks for _, m in pairs for p in m.parameters())

    more = sum(len(pairs) for _, pairs in composite) > len(leaves[1])
    return more and weight(composite) > weight([leaves])


def _once(pairs: Blocks) -> Blocks:
    """`pairs` with each module at its first place only: one layer placed 4 times in a list (ALBERT's
    shared layer) is one block called 4 times a pass, `layers.0[k]`; as 4 blocks, each call was
    recorded 4 times, with three gains of exactly 1 between the copies."""
    seen: set[int] = set()
    once = []
    for name, module in pairs:
        if id(module) not in seen:
            seen.add(id(module))
            once.append((name, module))
    return tuple(once)


def _called(prefix: str, container: nn.ModuleList | nn.Sequential | nn.ModuleDict) -> Blocks:
    """The children of `container`, named as get_submodule finds them (`prefix.key`), each as the
    modules a forward calls: itself, or where its class has no forward (a ModuleList or ModuleDict,
    never called itself) its own children's, in order (`prefix.i.j`). A hook on a module never called
    records nothing: a stack of such stages read as no blocks at all, growth 1. Where that reading,
    with each plain nn.Sequential stage of composite blocks of one type (a ResNet stage) read as its
    blocks, is of one type, it is taken: read as stages, a residual block's gain was hidden in its
    stage's (where some stages open with a transition, the stages are the stack: a partial descent
    mixed types and lost the stack). A module placed twice in the container is there twice."""
    plain = _children(prefix, container, stages=False)
    if any(_stage(m) for _, m in plain):
        deep = _children(prefix, container, stages=True)
        if len({_kind(m) for _, m in deep}) == 1:
            return deep
    return plain


def _children(prefix: str, container: nn.Module, stages: bool) -> Blocks:
    """`_called`'s reading of `container`, descending into `_stage` children where `stages`."""
    out: list[tuple[str, nn.Module]] = []
    for key, child in container._modules.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(child, nn.ModuleList | nn.ModuleDict) and (
            inspect.getattr_static(type(child), "forward") is nn.Module.forward
        ):
            out += _called(name, child)
        elif stages and _stage(child):
            out += _children(name, child, stages=True)
        elif child is not None:
            out.append((name, child))
    return tuple(out)


def _stage(module: nn.Module | None) -> TypeGuard[nn.Sequential]:
    """Whether `module` is a plain nn.Sequential (its forward calls each child in order) of one or more
    composite modules of one type: a stage of blocks (a ResNet's residual blocks, conv-norm-activation
    layers), not the parts of a layer (Linear, Tanh)."""
    if type(module) is not nn.Sequential or len(module) == 0:
        return False
    children = list(module.children())
    return len({_kind(m) for m in children}) == 1 and all(any(True for _ in m.children()) for m in children)


class Layer(nn.Module):
    """A layer of a flat Sequential of mixed modules (Linear, Tanh, Linear, ...), as a block for the
    hooks (never called): the parameters and input of its module with parameters, and as output the
    input of the next one (the activation after it included, even one shared between layers), or
    for the last layer the output of the Sequential's last module (`after`, at its last place). Each
    gain is a whole layer's, not alternately a weight's x2 and an activation's x0.5, and the last
    activation is in the chain. A forward hook gets the layer's input as its `args`, as a module's
    would (the next module's input, the layer's output, blamed a NaN the layer made on the code
    before it)."""

    def __init__(
        self, weighted: nn.Module, after: nn.Module, last: bool, container: nn.Module, nth: int = 1
    ) -> None:
        super().__init__()
        self.weighted = weighted  # a child: the layer's parameters are its own
        # in a tuple, not children: the next layer's parameters are not ours. `after` is the nth use
        # of its module in `container` (a module used at several places in one Sequential)
        self._after = (after, last, container, nth)

    def register_forward_hook(  # type: ignore[override]
        self, hook: Callable[..., Any], *, with_kwargs: bool = False
    ) -> RemovableHandle:
        """Call `hook(self, the weighted module's input, the layer's output)` once per pass of the
        container, from hooks on the weighted module, on `after` and on the container; the handle
        removes all three. `after`'s calls are counted modulo its places in the container, so the
        nth place's call is this layer's whichever way the container is run."""
        after, last, container, nth = self._after
        if with_kwargs:  # the layer's module with parameters is called positionally, as a Sequential does
            given_hook = hook

            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
                return given_hook(module, args, {}, output)

        uses = max(1, sum(m is after for m in container._modules.values()))  # its places in the container
        calls = [0]  # calls of `after` since the container's pass began, counted modulo its places (a
        # model looping over the Sequential itself never calls it: each pass still calls every place)

        def counted() -> bool:
            calls[0] += 1
            return (calls[0] - 1) % uses == nth - 1

        given: list[tuple[Any, ...]] = [()]  # the input of the module with parameters, as it ran

        def on_input(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            given[0] = args

        def on_next_input(module: nn.Module, args: tuple[Any, ...]) -> None:
            if counted() and args:
                hook(self, given[0], args[0])
            given[0] = ()

        def on_last_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if counted():
                hook(self, given[0], output)
            given[0] = ()

        def on_pass(module: nn.Module, args: tuple[Any, ...]) -> None:
            calls[0] = 0

        taken = self.weighted.register_forward_hook(on_input)  # before `after`'s, where it is the same
        own = (
            after.register_forward_hook(on_last_output)
            if last
            else after.register_forward_pre_hook(on_next_input)
        )
        handles = taken, own, container.register_forward_pre_hook(on_pass)
        return cast(RemovableHandle, _Handles(handles))

    def register_forward_pre_hook(self, hook: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        return self.weighted.register_forward_pre_hook(hook, **kwargs)


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, handles: tuple[RemovableHandle, ...]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _nth_uses(mods: list[nn.Module]) -> list[int]:
    """For each position, which use of its module it is (1 for the first; a module at several places
    in one Sequential is called once per place)."""
    seen: dict[int, int] = {}
    out = []
    for m in mods:
        seen[id(m)] = seen.get(id(m), 0) + 1
        out.append(seen[id(m)])
    return out


def own_blocks(model: nn.Module, blocks: Any, who: str, modules: Sequence[nn.Module] = ()) -> Blocks:
    """`blocks` as (name, module) pairs of the model's own submodules (`modules`, where the caller
    walked them already), input side first; anything else is a one-line UsageError from `who` (a
    block the model never calls would read as a flat, stable chain)."""
    pairs = tuple(tuple(pair) if isinstance(pair, list) else pair for pair in blocks)
    owned = {id(m) for m in (modules or model.modules())}
    for pair in pairs:
        shaped = isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
        if shaped and isinstance(pair[1], nn.Module):
            if id(pair[1].weighted if isinstance(pair[1], Layer) else pair[1]) in owned:
                continue
            kind = type(pair[1]).__name__
            got = f"({pair[0]!r}, a {kind} that is not a submodule of this model: a copy's?)"
        else:
            got = f"a {type(pair).__name__}" if isinstance(pair, nn.Module) else repr(pair).splitlines()[0]
        raise UsageError(
            f"{who}: blocks must be (name, module) pairs of the model's own submodules, input side "
            f"first, got {got}; e.g. blocks=[(f'blocks.{{i}}', b) for i, b in enumerate(model.blocks)]"
        )
    distinct(pairs, who)
    return pairs


def distinct(pairs: Sequence[tuple[str, nn.Module]], who: str) -> None:
    """A one-line UsageError from `who` where (name, module) `pairs` list a module or a name twice."""
    first: dict[int, str] = {}  # a module listed twice is hooked twice: each call read as two blocks
    named: set[str] = set()
    for name, module in pairs:
        if not isinstance(module, Layer) and first.setdefault(id(module), name) != name:
            raise UsageError(
                f"{who}: blocks {first[id(module)]!r} and {name!r} are the same module, whose every call "
                "would read as two blocks (a gain of exactly 1 between them); list each block once"
            )
        if name in named:  # the report, the culprit and the JSON name blocks by name
            raise UsageError(f"{who}: two blocks are named {name!r}; give each block a name of its own")
        named.add(name)


DECLARE_EXAMPLE = 'e.g. `return [(f"layers.{i}", m) for i, m in enumerate(self.layers)]`'


def declared_blocks(model: nn.Module) -> Callable[[], Any] | None:
    """The model's `stability_blocks` method, None where it has none; a one-line UsageError where the
    attribute is no method (a list given there was passed over for the blocks found)."""
    declared = getattr(model, "stability_blocks", None)
    if declared is not None and not callable(declared):
        raise UsageError(
            f"the model's stability_blocks is {article(declared)}, not a method; define it as one, "
            f"{DECLARE_EXAMPLE}"
        )
    return cast("Callable[[], Any] | None", declared)


def declared_pairs(model: nn.Module, got: Any) -> Blocks:
    """What the model's `stability_blocks()` returned (`got`), checked: a non-empty list (or any
    iterable) of (name, module) pairs of its own submodules, each listed once; anything else is a
    one-line UsageError saying which item is wrong (None raised a TypeError out of the probe, a
    module that is no submodule was dropped in silence, one listed twice read a gain of exactly 1)."""
    scalar = (str, bytes, Mapping, nn.Module, torch.Tensor)
    pairs = isinstance(got, Iterable) and not isinstance(got, scalar)
    items = list(got) if pairs else None  # a list, a generator, a dict's items()
    if not items:
        what = f"an empty {type(got).__name__}" if items == [] else article(got)
        raise UsageError(
            f"stability_blocks() returned {what}; it must return a non-empty list of "
            f"(name, module) pairs, input side first, {DECLARE_EXAMPLE}"
        )
    own = {id(m) for m in model.modules()}
    for i, item in enumerate(items):
        pair = isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)
        if not pair or not isinstance(item[1], nn.Module):
            raise UsageError(
                f"stability_blocks() item {i} is {article(item)}, not a (name, module) pair; "
                f"{DECLARE_EXAMPLE}"
            )
        if id(item[1]) not in own:
            raise UsageError(
                f"stability_blocks() item {i} ({item[0]!r}) is not a submodule of the model, so its "
                f"gradients are never seen; return the model's own blocks, {DECLARE_EXAMPLE}"
            )
    checked = tuple((item[0], item[1]) for item in items)
    distinct(checked, "stability_blocks()")
    return checked


BYPASSED = (  # no block seen; a library's own code (transformers' SqueezeBERT encoder) cannot be changed
    "a forward calling `block.forward(x)` bypasses module hooks (call `block(x)`; where a library's "
    "code does so, as hf:squeezebert's encoder, no hook sees its blocks: probe a model file whose forward "
    "calls them)"
)


def shown_blocks(names: Sequence[str], most: int = 3) -> str:
    """The first `most` block names, as a message shows them (measurement.shown), then '...' where
    there are more: a message's list of blocks."""
    return ", ".join(shown(n) for n in names[:most]) + (", ..." if len(names) > most else "")


LEAVES_NOTE = "blocks: leaf modules with parameters"  # the last resort of find_blocks
DECLARED_NOTE = "blocks: declared by stability_blocks()"
MIXED = "mixed module"  # in the note of blocks taken from a list of mixed module types


def find_blocks(model: nn.Module) -> tuple[Blocks, str]:
    """The model's chain of repeated blocks, input side first, and one line saying which rule chose
    them: its `stability_blocks()` if defined; else the longest stack of same-type modules (length 1
    included), and where its blocks are composite, every other stack of composite blocks beside it (an
    encoder-decoder's two stacks; a longest stack of leaf layers stands alone, unless the stacks of
    composite blocks outweigh it: `_outweighs`);
    else the longest ModuleList/Sequential of >= 2 modules (not one laid out as another of its
    parent's modules: `_repeated`), in a Sequential those owning parameters
    where there are two or more (Linear, Tanh, Linear, ...: each gain is then a whole layer's,
    activation included, not alternately a weight's x2 and an activation's x0.5); else its recurrent
    cells (nn.RNNCell, LSTMCell, GRUCell: each call a block); else its leaf modules that own
    parameters (where a forward shows modules called again on their own output, loops.looped_blocks
    takes those instead). Of a torch.compile'd model, the blocks of the model it wraps, named as there (not
    `_orig_mod.layers.0`): the same modules, whose hooks the compiled forward runs."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return find_blocks(inner)
    declared = declared_blocks(model)
    if declared is not None:
        return declared_pairs(model, declared()), DECLARED_NOTE
    stacks = stacks_in(model)
    if stacks:
        primary = max(stacks, key=_longest)
        composite = [s for s in stacks if list(s[1][0][1].children())]
        chosen = composite if primary in composite or _outweighs(composite, primary) else [primary]
        blocks = tuple(b for _, pairs in chosen for b in pairs)
        parts = " + ".join(f"{name or '(model)'} ({len(pairs)})" for name, pairs in chosen)
        return blocks, f"blocks: {parts}"
    lists = [
        (name, _called(name, m))
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList | nn.Sequential)
        and not _reparametrizing(model, name)
        and len(m) >= 2
        and not _repeated(model, name, m)
    ]
    if lists:
        name, blocks = max(lists, key=lambda s: len(s[1]))
        mods = [m for _, m in blocks]
        weighted = [(n, m) for n, m in blocks if any(True for _ in m.parameters())]
        label = name or "(model)"
        container = dict(model.named_modules())[name]
        small = _small_share(model, container)
        # layers of a Sequential (called, or looped over by the model: every place runs each pass); a
        # ModuleList's modules may run in any order, each a block
        if len(weighted) >= 2 and len(weighted) < len(blocks) and isinstance(container, nn.Sequential):
            nth = _nth_uses(mods)
            where = {n: k for k, (n, _) in enumerate(blocks)}  # position of each named module in mods
            layers = tuple(
                (
                    n,
                    Layer(m, weighted[i + 1][1], False, container, nth[where[weighted[i + 1][0]]])
                    if i + 1 < len(weighted)
                    else Layer(m, mods[-1], True, container, nth[-1]),
                )
                for i, (n, m) in enumerate(weighted)
            )
            return layers, (
                f"blocks: {label} ({len(weighted)} layers of {len(mods)} {MIXED}s: each module with "
                f"parameters and those after it){small}"
            )
        return blocks, f"blocks: {label} ({len(mods)}, {MIXED} types){small}"
    # a recurrent cell outside any list is the model's repeated unit, called once per token: its
    # input projection and head beside it would interleave with its calls (inp[t], cell[t], ...)
    cells = tuple((name, m) for name, m in model.named_modules() if isinstance(m, nn.RNNCellBase))
    if cells:
        return cells, f"blocks: {' + '.join(n for n, _ in cells)} (recurrent cells: a block per call)"
    leaves = tuple(  # the model itself, a bare nn.RNN, by a name (its own is ''): a blank culprit
        (name or "(model)", m) for name, m in model.named_modules() if _leaf(model, name, m)
    )
    return leaves, f"{LEAVES_NOTE} (no repeated stack found)"


SMALL_SHARE = 0.01  # a list holding less of the model's parameters than this is said to be small


def _small_share(model: nn.Module, container: nn.Module) -> str:
    """A note where the list find_blocks fell back on holds under SMALL_SHARE of the model's parameters:
    timm's DLA-34 was read on `level2.project`, a 1x1 projection on a shortcut (0.01% of them), whose
    growth 1.45 said nothing of its levels' 5.35e4 (an audit); '' otherwise."""
    if any(is_lazy(p) for p in model.parameters()):  # sizes not known before a forward
        return ""
    total = sum(p.numel() for p in model.parameters())
    held = sum(p.numel() for p in container.parameters())
    if not total or held >= SMALL_SHARE * total:
        return ""
    return (
        f"; it holds {held / total:.2%} of the model's parameters: if it is not the model's chain of "
        "blocks, declare them (blocks=... or stability_blocks())"
    )


def _repeated(model: nn.Module, name: str, container: nn.Module) -> bool:
    """Whether `container` is one of several units of one layout side by side, another of its
    parent's modules laid out alike (`_layout`): layers held as attributes (l0 ... l11, each a
    Sequential(Linear, Tanh)) or in a ModuleDict, whose first alone was read as the model's list
    (growth 0.74 and 1.56 for 78 and 80: an audit), or two towers alike. No one of them is the
    model's chain; the leaf modules are, whose calls a forward puts in order (loops.looped_blocks)."""
    if not name:
        return False
    parent = model.get_submodule(name.rpartition(".")[0])
    shape = _layout(container)
    return any(c is not container and c is not None and _layout(c) == shape for c in parent._modules.values())


def _layout(module: nn.Module) -> tuple[type, ...]:
    """A module's kind, and for a container (Sequential, ModuleList, ModuleDict) its children's kinds:
    two Sequentials of other layers are no repeated unit."""
    if isinstance(module, nn.Sequential | nn.ModuleList | nn.ModuleDict):
        return (_kind(module), *(_kind(c) for c in module.children()))
    return (_kind(module),)


def _leaf(model: nn.Module, name: str, m: nn.Module) -> bool:
    """A module with parameters and no submodules, a parametrized layer counted as one: its
    `parametrizations` compute its weight, which it owns (two weight-normed Linears outside any list
    had no leaf at all, and the probe refused the model for an empty blocks= it was never given)."""
    if _reparametrizing(model, name):
        return False
    wrapped = parametrize.is_parametrized(m)
    if any(not (wrapped and child == "parametrizations") for child, _ in m.named_children()):
        return False
    return wrapped or any(True for _ in m.parameters(recurse=False))
