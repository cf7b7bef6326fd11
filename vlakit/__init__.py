"""vlakit: small, typed PyTorch building blocks for vision-language-action models.

Runtime shape checking: set the environment variable ``VLAKIT_TYPECHECK=1`` *before*
importing vlakit and every jaxtyping annotation in the package is checked by beartype
(a wrong shape raises, naming the dimension). It is off by default: checking costs time
on every call and does not compose with ``torch.compile``. The test suite turns it on.
"""

import os as _os

__version__ = "0.1.0"


def _typecheck_requested() -> bool:
    return _os.environ.get("VLAKIT_TYPECHECK", "").lower() in ("1", "true", "yes", "on")


if _typecheck_requested():
    from jaxtyping import install_import_hook as _install_import_hook

    # Installed for the rest of the process: every vlakit submodule imported after this
    # line has its annotated functions wrapped in jaxtyped(typechecker=beartype).
    _TYPECHECK_HOOK = _install_import_hook("vlakit", "beartype.beartype")

from vlakit import (  # noqa: E402
    actions,
    batch,
    core,
    decoders,
    heads,
    interleave,
    language,
    models,
    persistence,
    processors,
    projectors,
    pruners,
    vision,
)
from vlakit.batch import VLAInputs, VLAOutput  # noqa: E402
from vlakit.core import TokenRole, TokenSequence  # noqa: E402
from vlakit.core.checks import set_validation, validation, validation_enabled  # noqa: E402
from vlakit.model import VLA  # noqa: E402
from vlakit.runner import VLAPrefix, VLARunner  # noqa: E402
from vlakit.summary import count_parameters, parameter_table  # noqa: E402


def typecheck_enabled() -> bool:
    """Whether runtime shape checking was switched on for this process."""
    return _typecheck_requested()


__all__ = [
    "VLA",
    "VLAInputs",
    "VLAOutput",
    "VLARunner",
    "VLAPrefix",
    "set_validation",
    "validation",
    "validation_enabled",
    "TokenRole",
    "TokenSequence",
    "actions",
    "batch",
    "core",
    "decoders",
    "heads",
    "interleave",
    "language",
    "models",
    "persistence",
    "processors",
    "projectors",
    "pruners",
    "vision",
    "count_parameters",
    "parameter_table",
    "typecheck_enabled",
    "__version__",
]
