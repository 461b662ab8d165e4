"""torch's optimizers without ``torch._dynamo`` until something compiles (issue 25).

``torch._dynamo`` (with ``torch._inductor`` behind it) takes longer to import than ``torch``
itself (1.3-2.0 s against 1.6 s on the dev machine), and eager training never uses it. Yet a
torch optimizer imports it on its first call: ``Optimizer.add_param_group``, ``zero_grad``,
``state_dict`` and ``load_state_dict`` are wrapped by ``torch._disable_dynamo`` (which imports
dynamo on the first call to build the real wrapper), and ``step`` by
``_use_grad_for_differentiable`` (``import torch._dynamo`` for two ``graph_break()`` calls,
no-ops outside a trace).

DeepSpeed does the same: ZeRO-3 decorates its module hooks with ``torch.compiler.disable``
(which imports dynamo at once) and many functions with ``torch._disable_dynamo``.

These wrappers only matter while dynamo traces, and nothing traces before ``torch._dynamo`` is
imported (``torch.compile`` imports it first). So :func:`defer_dynamo` gives them a path that
checks ``sys.modules`` on each call: without dynamo it calls the function itself (the same
code, the same grad mode); once dynamo is imported (a ``torch.compile`` anywhere) it hands over
to torch's own wrapper. Everything found by its shape is left alone when this torch version
shapes it otherwise (then dynamo is imported as before: slower, not wrong).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any

from hpcdl.util import get_logger

log = get_logger(__name__)

_DONE = False
DYNAMO = "torch._dynamo"
_MARK = "__hpcdl_lazy_dynamo"  # set on the step wrappers this module made


def _cells(fn: Any) -> dict[str, Any]:
    """A function's closure as ``{free variable: value}`` (empty for a plain function)."""
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not closure:
        return {}
    try:
        return {
            name: cell.cell_contents for name, cell in zip(code.co_freevars, closure, strict=True)
        }
    except ValueError:  # an empty cell
        return {}


def _chain(fn: Any) -> Iterator[Any]:
    """``fn`` and the functions it wraps (``__wrapped__``), outermost first."""
    seen: set[int] = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        yield fn
        fn = getattr(fn, "__wrapped__", None)


def _lazy_disable(fn: Callable[..., Any], recursive: bool) -> Callable[..., Any]:
    """What ``torch._disable_dynamo``'s wrapper calls for ``fn``: ``fn`` itself while dynamo
    is not imported (nothing can be tracing), torch's ``disable`` wrapper once it is."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if DYNAMO not in sys.modules:
            return fn(*args, **kwargs)
        import torch._dynamo

        real = torch._dynamo.disable(fn, recursive, wrapping=False)
        setattr(fn, "__dynamo_disable", real)  # torch's wrapper caches it there
        return real(*args, **kwargs)

    return call


def _lean_use_grad(torch_wrapper: Callable[..., Any], func: Callable[..., Any]) -> Any:
    """``_use_grad_for_differentiable(func)`` without its dynamo import: the same grad mode
    around ``func``; torch's own wrapper (``torch_wrapper``) once dynamo is imported."""
    import torch

    def _use_grad(*args: Any, **kwargs: Any) -> Any:
        if DYNAMO in sys.modules:
            return torch_wrapper(*args, **kwargs)
        self = args[0]
        prev = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            return func(*args, **kwargs)
        finally:
            torch.set_grad_enabled(prev)

    functools.update_wrapper(_use_grad, func)
    setattr(_use_grad, _MARK, True)
    return _use_grad


def _optimizer_classes() -> list[type]:
    import torch.optim

    found: list[type] = [torch.optim.Optimizer]
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
            found.append(obj)
    return found


def defer_dynamo() -> int:
    """Give torch's optimizers the lazy paths, and torch's two decorators lazy versions (once
    per process, before DeepSpeed is imported and any optimizer built: an optimizer's first
    construction wraps its class's ``step`` again). Returns how many optimizer wrappers were
    changed."""
    global _DONE
    if _DONE or DYNAMO in sys.modules:
        _DONE = True
        return 0
    _DONE = True
    import torch
    from torch.optim import optimizer as torch_optimizer

    disable_code = torch._disable_dynamo(lambda: None).__code__
    use_grad_code = torch_optimizer._use_grad_for_differentiable(lambda: None).__code__
    changed = 0
    for cls in _optimizer_classes():
        for attr, value in list(vars(cls).items()):
            if not callable(value):
                continue
            if (
                attr == "step"
                and getattr(value, "__code__", None) is use_grad_code
                and not getattr(value, "hooked", False)
            ):
                setattr(cls, attr, _lean_use_grad(value, value.__wrapped__))
                changed += 1
                continue
            for fn in _chain(value):
                if getattr(fn, "__code__", None) is not disable_code:
                    continue
                cells = _cells(fn)
                inner = cells.get("fn")
                if inner is not None and getattr(inner, "__dynamo_disable", None) is None:
                    setattr(inner, "__dynamo_disable",
                            _lazy_disable(inner, bool(cells.get("recursive", True))))  # fmt: skip
                    changed += 1
    _defer_decorators(torch)
    log.debug("torch._dynamo deferred in %d optimizer wrappers", changed)
    return changed


def _defer_decorators(torch: Any) -> None:
    """The same for functions decorated from now on (DeepSpeed's, imported after this):
    ``torch._disable_dynamo`` (which DeepSpeed's ``compiler.lazy_disable`` calls at import)
    and ``torch.compiler.disable`` (ZeRO-3's module hooks, decorated when the engine is built,
    which imports dynamo at once)."""
    disable_dynamo, compiler_disable = torch._disable_dynamo, torch.compiler.disable

    def lazy_disable_dynamo(fn: Any = None, recursive: bool = True) -> Any:
        if fn is None:
            return functools.partial(lazy_disable_dynamo, recursive=recursive)
        wrapped = disable_dynamo(fn, recursive)
        if DYNAMO not in sys.modules and getattr(fn, "__dynamo_disable", None) is None:
            setattr(fn, "__dynamo_disable", _lazy_disable(fn, recursive))
        return wrapped

    def lazy_compiler_disable(fn: Any = None, recursive: bool = True, *, reason: Any = None) -> Any:
        if DYNAMO in sys.modules or (fn is not None and not inspect.isfunction(fn)):
            return compiler_disable(fn, recursive, reason=reason)
        if fn is None:
            return functools.partial(lazy_compiler_disable, recursive=recursive, reason=reason)
        real: list[Callable[..., Any]] = []

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if DYNAMO not in sys.modules:
                return fn(*args, **kwargs)
            if not real:
                real.append(compiler_disable(fn, recursive, reason=reason))
            return real[0](*args, **kwargs)

        return call

    torch._disable_dynamo = lazy_disable_dynamo
    torch.compiler.disable = lazy_compiler_disable
