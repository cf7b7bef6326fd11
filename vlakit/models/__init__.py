"""Named assemblies: plain functions that call constructors.

- [`paligemma_3b`][vlakit.models.paligemma_3b], [`paligemma`][vlakit.models.paligemma.paligemma]
  (component builder),
  [`paligemma_from_transformers`][vlakit.models.paligemma_from_transformers]
- [`openvla_7b`][vlakit.models.openvla_7b], [`openvla`][vlakit.models.openvla.openvla] (component
  builder)
- [`openvla_oft_7b`][vlakit.models.openvla_oft_7b],
  [`openvla_oft`][vlakit.models.openvla_oft.openvla_oft] (component builder),
  [`oft_head`][vlakit.models.oft_head], [`oft_mask`][vlakit.models.oft_mask]
- [`lightvla_7b`][vlakit.models.lightvla_7b], [`lightvla`][vlakit.models.lightvla.lightvla]
  (component builder): OpenVLA-OFT with LightVLA's token pruner
- [`pi0_3b`][vlakit.models.pi0_3b], [`pi05_3b`][vlakit.models.pi05_3b],
  [`pi0`][vlakit.models.pi0.pi0] and [`pi05`][vlakit.models.pi05] (component builders):
  PaliGemma read by an action expert (pi0, pi0.5), with [`pi0_decoder`][vlakit.models.pi0_decoder],
  [`pi0_expert`][vlakit.models.pi0_expert], [`pi0_mask`][vlakit.models.pi0_mask] ; their
  processors are [`Pi0Processor`][vlakit.processors.Pi0Processor] and
  [`Pi05Processor`][vlakit.processors.Pi05Processor] (pi0.5's state prompt); LeRobot's image path
  ([`pi0_preprocessing`][vlakit.models.pi0_preprocessing])
- [`load_paligemma`][vlakit.models.load_paligemma], [`load_openvla`][vlakit.models.load_openvla],
  [`load_openvla_oft`][vlakit.models.load_openvla_oft],
  [`load_lightvla`][vlakit.models.load_lightvla]: a published checkpoint directory in one call
- [`load_pi0`][vlakit.models.load_pi0], [`load_pi05`][vlakit.models.load_pi05]: LeRobot's and
  openpi's pi0 / pi0.5 directories as a [PolicyBundle][vlakit.bundle.PolicyBundle]
- [`openvla_policy`][vlakit.models.openvla_policy],
  [`openvla_oft_policy`][vlakit.models.openvla_oft_policy],
  [`lightvla_policy`][vlakit.models.lightvla_policy]: the same directory as a
  [PolicyBundle][vlakit.bundle.PolicyBundle] (model, its tokenizer, the processor options
  the reference uses, observation keys): raw observations in, action chunks out

One file per family (timm's habit): ``paligemma.py``, ``openvla.py``, ``openvla_oft.py`` and
``lightvla.py`` each hold the family's builders, the reader of its published directory and
its weight map; the formats themselves are read in [vlakit.convert][vlakit.convert].
"""

from vlakit.models._common import read_config
from vlakit.models.lightvla import lightvla, lightvla_7b, lightvla_policy, load_lightvla
from vlakit.models.openvla import load_openvla, openvla, openvla_7b, openvla_policy
from vlakit.models.openvla_oft import (
    load_openvla_oft,
    oft_head,
    oft_mask,
    openvla_oft,
    openvla_oft_7b,
    openvla_oft_policy,
)
from vlakit.models.paligemma import (
    load_paligemma,
    paligemma,
    paligemma_3b,
    paligemma_from_transformers,
)
from vlakit.models.pi0 import (
    load_pi0,
    load_pi05,
    pi0,
    pi0_3b,
    pi0_decoder,
    pi0_expert,
    pi0_mask,
    pi0_preprocessing,
    pi05,
    pi05_3b,
)

__all__ = ["paligemma", "paligemma_3b", "paligemma_from_transformers", "openvla", "openvla_7b",
           "openvla_oft", "openvla_oft_7b", "oft_head", "oft_mask",
           "lightvla", "lightvla_7b", "load_paligemma", "load_openvla",
           "load_openvla_oft", "load_lightvla", "openvla_policy", "openvla_oft_policy",
           "lightvla_policy", "read_config", "pi0", "pi05", "pi0_3b", "pi05_3b",
           "pi0_decoder", "pi0_expert", "pi0_mask", "pi0_preprocessing",
           "load_pi0", "load_pi05"]
