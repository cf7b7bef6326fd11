"""How an iterative head (diffusion, flow matching) runs its steps for one prediction."""

import warnings
from collections.abc import Callable

from torch import Tensor

from vlakit.core import TokenSequence
from vlakit.heads.base import HeadTokens, ModelRunner


class StepRunner:
    """Runs one step's head tokens, against a cached prefix or as a full pass.

    ``cached``: the prefix (images, extras, prompt) is encoded once, for ``num_samples``
    samples per row, with cache slots reserved for the suffix of ``num_slots`` head tokens
    (as long as the interleaver makes it: ``runner.suffix_length``); each step runs only the
    suffix. Otherwise (the OFT layout, or a decoder with no read-only cache) every step runs
    the whole sequence at ``b * num_samples`` rows.
    """

    def __init__(
        self,
        head,
        runner: ModelRunner,
        num_samples: int,
        cached: bool,
        num_slots: int,
    ) -> None:
        self.batch_size = runner.batch_size * num_samples
        self.device, self.dtype = runner.device, runner.dtype
        self.cached = cached and runner.supports_prefix_cache
        if cached and not self.cached and not getattr(head, "_warned_full_rerun", False):
            head._warned_full_rerun = True
            warnings.warn(
                f"{type(head).__name__}(layout={head.layout!r}): this model keeps no read-only "
                f"prefix cache (its decoder has none, e.g. HFDecoder, or a pruner sits "
                f"between decoder layers), so every step re-runs the whole sequence (about "
                f"(P+S)/S times the compute per step; the same result unless a pruner scores "
                f"against the suffix, as LightVLA does); vlakit's TransformerDecoder with a "
                f"pruner before layer 0 runs the cached path",
                stacklevel=4,
            )
        self._run: Callable[[HeadTokens], tuple[Tensor, TokenSequence]]
        if self.cached:
            suffix_len = runner.suffix_length(num_slots)
            self._run = runner.prefix(num_samples, suffix_len=suffix_len).run
        else:
            self._run = runner.repeat(num_samples).run

    def __call__(self, tokens: HeadTokens) -> tuple[Tensor, TokenSequence]:
        """Final hidden states and the sequence they belong to (prefix runs: the last prefix
        token and the suffix; full runs: the whole sequence)."""
        return self._run(tokens)
