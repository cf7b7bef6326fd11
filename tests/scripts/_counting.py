"""The compile scripts' backend: aot_eager, counting the graphs it is handed (one per
compile or recompile), so a script can assert that a second call did not recompile."""

from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd


class CountingBackend:
    """aot_eager (autograd traced, forward run as captured), counting graphs."""

    def __init__(self) -> None:
        self.graphs = 0
        self._inner = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward))

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self._inner(gm, example_inputs)
