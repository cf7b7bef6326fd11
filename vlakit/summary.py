"""Parameter tables for any module (works on the ``meta`` device)."""

from torch import nn

__all__ = ["count_parameters", "parameter_table"]


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters())


def parameter_table(module: nn.Module, depth: int = 1) -> str:
    """A text table of parameter counts per child block down to ``depth``, ending in the total.

    Example::

        >>> print(parameter_table(openvla_7b(device="meta")))
    """
    rows: list[tuple[str, int]] = []

    def visit(prefix: str, mod: nn.Module, level: int) -> None:
        own = sum(p.numel() for p in mod.parameters(recurse=False))
        has_children = any(True for _ in mod.children())
        if own and level > 0 and has_children:  # held directly (e.g. a position embedding)
            rows.append((f"{'  ' * level}{prefix}(own)", own))
        for name, child in mod.named_children():
            n = count_parameters(child)
            if n == 0:
                continue
            rows.append((f"{'  ' * level}{prefix}{name}", n))
            long_list = isinstance(child, nn.ModuleList) and len(child) > 4  # layers
            if level + 1 < depth and not long_list:
                visit(f"{prefix}{name}.", child, level + 1)

    visit("", module, 0)
    total = count_parameters(module)
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'block':<{width}}  {'parameters':>15}", "-" * (width + 17)]
    lines += [f"{name:<{width}}  {n:>15,}" for name, n in rows]
    lines += ["-" * (width + 17), f"{'total':<{width}}  {total:>15,}"]
    return "\n".join(lines)
