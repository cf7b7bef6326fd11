"""Recording how a model was built, as data: the constructor tree behind ``save_pretrained``.

Every vlakit block is decorated with [recorded][vlakit.core.recorded]: its constructor
arguments are kept on the instance (nested blocks, lists and plain values as they were
passed), a few methods that change a block after construction (``ViT.truncate``,
``ViT.add_film``) record themselves as calls, and transforms that swap sub-modules (LoRA
applied or merged, linears replaced through a factory) go through
[replace_module][vlakit.core.replace_module], which records the new module in its
parent. [describe][vlakit.core.describe] turns that
into JSON-ready data (no pickle: classes and functions by their import path, dtypes and
enums by name, diffusers schedulers by their config) and [rebuild][vlakit.core.rebuild]
calls the same constructors again. No registry of names is involved: a class is found by
importing the module it is defined in.
"""

import dataclasses
import enum
import functools
import importlib
import inspect
import math
from typing import Any

import torch
from torch import nn

__all__ = [
    "recorded",
    "record_call",
    "replace_module",
    "describe",
    "rebuild",
    "DescriptionError",
]

FORMAT = "vlakit.constructor-tree"

_RECORDED_METHODS = {"truncate", "add_film"}
"""The methods that record themselves (record_call) and that rebuild repeats."""


class DescriptionError(TypeError):
    """A model (or one of its arguments) cannot be described as data, or a description
    cannot be rebuilt."""


def recorded(cls: type) -> type:
    """Class decorator: keep the constructor arguments of every instance.

    After ``cls(...)`` the instance holds ``(cls, {argument: value})`` for the arguments
    that were passed (defaults are not stored, so a description stays what the user
    wrote) and a snapshot of its child modules, so that a child replaced later (say
    ``model.pruner = ...``) is caught when the model is described, instead of being lost.
    A subclass must be decorated too (its arguments differ). A class may name arguments
    that say where weights come from rather than what is built (``_recorded_skip = (
    "pretrained",)``): they are left out, so a rebuild never downloads what the saved state
    dict holds anyway.
    """
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(signature.parameters)))  # self
        for name in cls.__dict__.get("_recorded_skip", ()):
            arguments.pop(name, None)
        for name, parameter in signature.parameters.items():
            if parameter.kind is parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
            elif parameter.kind is parameter.VAR_POSITIONAL and arguments.get(name):
                raise DescriptionError(f"{cls.__name__} takes *{name}; it cannot be recorded")
            elif parameter.kind is parameter.VAR_POSITIONAL:
                arguments.pop(name, None)
        self.__dict__["_recorded_init"] = (cls, arguments)
        self.__dict__["_recorded_calls"] = []
        _snapshot(self)

    cls.__init__ = __init__
    cls.__vlakit_recorded__ = True  # rebuild() calls only classes that carry this mark
    return cls


def record_call(obj: Any, method: str, **arguments: Any) -> None:
    """Record that ``obj.method(**arguments)`` changed ``obj`` after construction (a
    rebuild repeats the call). Called by the method itself, at its end."""
    if "_recorded_init" in getattr(obj, "__dict__", {}):
        obj.__dict__["_recorded_calls"].append((method, arguments))
        for module in obj.modules() if isinstance(obj, nn.Module) else [obj]:
            _snapshot(module)  # the call may have changed blocks inside obj too


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace ``root``'s sub-module ``name`` (a dotted path) by ``module`` and record it, so a
    saved description rebuilds the replacement: the parent's description carries
    ``"replaced": {child: description of module}``, applied after the parent is built and its
    recorded calls are repeated. Transforms (``apply_lora``, ``merge_lora``,
    ``replace_linears``, a loader keeping LoRA layers) call this; a child replaced by plain
    assignment is still refused by [describe][vlakit.core.describe], since nothing says how
    it came to be."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if child not in parent._modules:
        raise KeyError(f"{type(parent).__name__} has no sub-module {child!r} to replace "
                       f"(looked up {name!r} in {type(root).__name__})")
    setattr(parent, child, module)
    parent.__dict__.setdefault("_recorded_replaced", []).append(child)


def _replaced(obj: Any) -> list[str]:
    """The children of ``obj`` a transform replaced, once each, in order of first
    replacement (the current module in each slot is what gets described)."""
    names = obj.__dict__.get("_recorded_replaced", [])
    return [n for i, n in enumerate(names) if n not in names[:i] and n in obj._modules]


def _collect_replaced(obj: nn.Module, arguments: dict) -> dict[str, nn.Module]:
    """The recorded replacements inside ``obj`` by dotted path: in ``obj`` itself and in the
    sub-modules its constructor built (not those passed as arguments, which describe their
    own, nor inside a replacement, which is described whole)."""
    passed: set[int] = set()

    def note(value: Any) -> None:
        if isinstance(value, nn.Module):
            passed.add(id(value))
        elif isinstance(value, (list, tuple)):
            for v in value:
                note(v)
        elif isinstance(value, dict):
            for v in value.values():
                note(v)

    note(arguments)
    found: dict[str, nn.Module] = {}

    def walk(prefix: str, module: nn.Module) -> None:
        swapped = _replaced(module)
        for name in swapped:
            found[prefix + name] = module._modules[name]
        for name, child in module._modules.items():
            if child is not None and name not in swapped and id(child) not in passed:
                walk(f"{prefix}{name}.", child)

    walk("", obj)
    return found


def _snapshot(obj: Any) -> None:
    # the children themselves (not their ids): deepcopy and pickling keep the snapshot in
    # step with the copied children, and a freed id cannot be reused by a newcomer
    if isinstance(obj, nn.Module):
        obj.__dict__["_recorded_children"] = dict(obj._modules)


def _path(thing: Any) -> str:
    return f"{thing.__module__}.{thing.__qualname__}"


def _find(path: str) -> Any:
    module, _, name = path.rpartition(".")
    while module:
        try:
            found = importlib.import_module(module)
            for part in name.split("."):
                found = getattr(found, part)
            return found
        except (ImportError, AttributeError):
            module, _, head = module.rpartition(".")
            name = f"{head}.{name}"
    raise DescriptionError(f"cannot find {path!r} to rebuild it")


_TORCH_MODULES = {
    nn.GELU: lambda m: {"approximate": m.approximate},
    nn.SiLU: lambda m: {},
    nn.ReLU: lambda m: {},
    nn.Tanh: lambda m: {},
    nn.Sigmoid: lambda m: {},
    nn.Identity: lambda m: {},
    nn.Dropout: lambda m: {"p": m.p},
    nn.LayerNorm: lambda m: {"normalized_shape": tuple(m.normalized_shape), "eps": m.eps,
                             "elementwise_affine": m.elementwise_affine,
                             "bias": m.bias is not None},
    nn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                          "bias": m.bias is not None},
}


def describe(obj: Any, *, _memo: dict | None = None, _where: str = "model") -> Any:
    """``obj`` as JSON-ready data (see the module docstring); raises a
    [DescriptionError][vlakit.core.DescriptionError] naming the offending part (a wrapped
    timm or transformers model, a lambda, a block replaced after construction)."""
    memo = {} if _memo is None else _memo
    where = _where

    def inner(value: Any, where: str) -> Any:
        return describe(value, _memo=memo, _where=where)

    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return {"$enum": _path(type(obj)), "name": obj.name}
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, torch.dtype):
        return {"$dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, list):
        return [inner(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"$tuple": [inner(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, (set, frozenset)):
        items = sorted(obj, key=lambda v: (str(type(v)), v))
        return {"$set": [inner(v, where) for v in items]}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise DescriptionError(f"{where}: a dict with non-string keys cannot be described")
        return {"$dict": {k: inner(v, f"{where}[{k!r}]") for k, v in obj.items()}}
    if isinstance(obj, torch.Tensor):
        if obj.numel() > 64:
            raise DescriptionError(f"{where}: a tensor argument of {obj.numel()} values; "
                                   f"weights belong in the state dict")
        return {"$tensor": obj.tolist(), "dtype": str(obj.dtype).removeprefix("torch.")}
    if id(obj) in memo:
        return {"$same": memo[id(obj)]}
    record = getattr(obj, "__dict__", {}).get("_recorded_init")
    if record is not None:
        cls, arguments = record
        if type(obj) is not cls:
            raise DescriptionError(
                f"{where} is a {type(obj).__name__}, a subclass of the recorded "
                f"{cls.__name__} that is not recorded itself: decorate it with "
                f"@vlakit.core.recorded"
            )
        if "<" in _path(cls) or cls.__module__ == "__main__":
            raise DescriptionError(f"{where} is a {_path(cls)}, which cannot be imported by "
                                   f"name when the model is loaded; define it in a module")
        _check_children(obj, arguments, where)
        memo[id(obj)] = len(memo)
        described = {
            "$class": _path(cls), "$id": memo[id(obj)],
            "args": {k: inner(v, f"{where}.{k}") for k, v in arguments.items()},
            "calls": [[name, {k: inner(v, f"{where}.{name}({k})") for k, v in args.items()}]
                      for name, args in obj.__dict__.get("_recorded_calls", [])],
        }
        replaced = _collect_replaced(obj, arguments) if isinstance(obj, nn.Module) else {}
        if replaced:
            described["replaced"] = {
                name: inner(module, f"{where}.{name}") for name, module in replaced.items()
            }
        return described
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: inner(getattr(obj, f.name), f"{where}.{f.name}")
                  for f in dataclasses.fields(obj) if f.init}
        return {"$class": _path(type(obj)), "args": fields, "calls": []}
    if type(obj) in _TORCH_MODULES:
        args = _TORCH_MODULES[type(obj)](obj)
        return {"$class": _path(type(obj)), "args": {k: inner(v, where) for k, v in args.items()},
                "calls": []}
    if isinstance(obj, functools.partial):
        return {"$partial": inner(obj.func, f"{where}.func"),
                "args": [inner(v, f"{where}.args") for v in obj.args],
                "kwargs": {k: inner(v, f"{where}.{k}") for k, v in obj.keywords.items()}}
    if isinstance(obj, type) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
        path = _path(obj)
        if "<" in path or _find(path) is not obj:
            raise DescriptionError(f"{where} is {obj!r}, which cannot be imported by name "
                                   f"(a lambda or a local function?); use a module-level one")
        return {"$ref": path}
    config = getattr(obj, "config", None)
    if callable(getattr(type(obj), "from_config", None)) and isinstance(config, dict):
        return {"$from_config": _path(type(obj)), "config": inner(dict(config), where)}
    raise DescriptionError(
        f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which vlakit cannot "
        f"describe as constructor arguments (wrapped timm, open_clip and transformers "
        f"models keep their own formats); save its state dict instead, or, for a "
        f"TimmEncoder, build it from the timm model name (TimmEncoder('vit_base_patch16_224', "
        f"img_size=...)), which saves"
    )


def _check_children(obj: Any, arguments: dict, where: str) -> None:
    snapshot = obj.__dict__.get("_recorded_children")
    if snapshot is None or not isinstance(obj, nn.Module):
        return
    now, transformed = obj._modules, set(_replaced(obj))
    changed = sorted(k for k in set(now) | set(snapshot)
                     if now.get(k) is not snapshot.get(k) and k not in transformed)
    if changed:
        raise DescriptionError(
            f"{where}.{changed[0]} was replaced after {type(obj).__name__} was built, so the "
            f"constructor arguments no longer describe it; pass it to the constructor instead "
            f"(or replace it with vlakit.core.replace_module, which records the change)"
        )


_SAFE_REF_PREFIXES = ("vlakit.", "torch.nn.")
_SAFE_CONFIG_PREFIXES = ("diffusers.",)


def _safe_class(path: str, trusted: tuple[str, ...]) -> type:
    """The class a description names, if rebuilding may call it: a ``@recorded`` vlakit
    class, one of the torch modules `describe` writes, or a vlakit dataclass. A description
    is data from a file: anything else (``os.system``, ...) is refused, never called; and
    only modules under ``trusted`` prefixes are imported at all."""
    if not path.startswith(trusted):
        raise DescriptionError(f"the description names {path!r}, outside the trusted modules "
                               f"{list(trusted)}; it is not imported (pass trust=('yourpkg.',) "
                               f"for your own blocks)")
    cls = _find(path)
    allowed = isinstance(cls, type) and (
        getattr(cls, "__dict__", {}).get("__vlakit_recorded__", False)
        or cls in _TORCH_MODULES
        or (dataclasses.is_dataclass(cls) and cls.__module__.startswith("vlakit."))
    )
    if not allowed:
        raise DescriptionError(
            f"the description names {path!r}, which is not a vlakit block (a @recorded "
            f"class), a listed torch module or a vlakit dataclass; it is not called"
        )
    return cls


def _safe_ref(path: str, prefixes: tuple[str, ...]) -> Any:
    if not path.startswith(prefixes):
        raise DescriptionError(f"the description refers to {path!r}, outside {list(prefixes)}; "
                               f"it is not imported")
    return _find(path)


def rebuild(description: Any, *, trust: tuple[str, ...] = (), _memo: dict | None = None) -> Any:
    """Call the constructors a [describe][vlakit.core.describe] output names, in order;
    recorded calls are repeated. Build on ``meta`` (``with building(None, "meta")``) to
    skip initialisation when weights are loaded next.

    A description is treated as untrusted data: only ``@recorded`` vlakit classes, the
    torch modules ``describe`` writes and vlakit dataclasses are called; functions and
    classes passed as arguments must live under ``vlakit.`` or ``torch.nn.``; schedulers
    under ``diffusers.``; only ``__init__`` arguments and the recorded methods
    (``truncate``, ``add_film``) are applied. Anything else raises a
    [DescriptionError][vlakit.core.DescriptionError] without being called. ``trust``: more
    module prefixes whose ``@recorded`` classes and functions may be used (your own blocks).
    """
    memo = {} if _memo is None else _memo
    trusted = _SAFE_REF_PREFIXES + tuple(trust)

    def inner(value: Any) -> Any:
        return rebuild(value, trust=trust, _memo=memo)

    if isinstance(description, list):
        return [inner(v) for v in description]
    if not isinstance(description, dict):
        return description
    if "$tuple" in description:
        return tuple(inner(v) for v in description["$tuple"])
    if "$set" in description:
        return {inner(v) for v in description["$set"]}
    if "$dict" in description:
        return {k: inner(v) for k, v in description["$dict"].items()}
    if "$enum" in description:
        return _safe_ref(description["$enum"], ("vlakit.",))[description["name"]]
    if "$float" in description:
        return float(description["$float"])
    if "$dtype" in description:
        return getattr(torch, description["$dtype"])
    if "$tensor" in description:
        return torch.tensor(description["$tensor"], dtype=getattr(torch, description["dtype"]),
                            device="cpu")  # a value, also when rebuilding on meta
    if "$ref" in description:
        return _safe_ref(description["$ref"], trusted)
    if "$partial" in description:
        return functools.partial(inner(description["$partial"]), *inner(description["args"]),
                                 **{k: inner(v) for k, v in description["kwargs"].items()})
    if "$same" in description:
        return memo[description["$same"]]
    if "$from_config" in description:
        cls = _safe_ref(description["$from_config"], _SAFE_CONFIG_PREFIXES)
        return cls.from_config(inner(description["config"]))
    if "$class" in description:
        cls = _safe_class(description["$class"], trusted)
        obj = cls(**{k: inner(v) for k, v in description["args"].items()})
        for name, arguments in description.get("calls", []):
            if name not in _RECORDED_METHODS:
                raise DescriptionError(f"the description calls {name!r} on {cls.__name__}; "
                                       f"only {sorted(_RECORDED_METHODS)} are repeated")
            getattr(obj, name)(**{k: inner(v) for k, v in arguments.items()})
        for name, child in description.get("replaced", {}).items():
            try:
                replace_module(obj, name, inner(child))
            except (AttributeError, KeyError) as error:
                raise DescriptionError(f"the description replaces {cls.__name__}.{name}, which "
                                       f"the rebuilt {cls.__name__} does not have") from error
        if "$id" in description:
            memo[description["$id"]] = obj
        return obj
    raise DescriptionError(f"cannot rebuild {description!r}")
