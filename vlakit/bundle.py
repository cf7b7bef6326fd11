"""The policy bundle: the one deployable artefact (model, processor, tokenizer, observation
keys, statistics), saved as one directory and loaded in one call.

A bundle turns a raw observation, as a robot or openpi's client sends it (a flat dict of
numpy / PIL images, a state vector and an instruction string), into an action chunk::

    bundle = PolicyBundle(model, processor, ObservationKeys(
        images=("observation/image", "observation/wrist_image"),
        state="observation/state", prompt="prompt"))
    bundle.save("my_policy")
    policy = PolicyBundle.load("my_policy")
    chunk = policy({"observation/image": frame, "observation/wrist_image": wrist,
                    "observation/state": state, "prompt": "pick up the cup"})  # [chunk, a]

Directory layout::

    my_policy/
      policy.json        format, processor class and arguments, observation keys, image size,
                         views, proprio and action widths, the normalisation statistics (for
                         reading: the model's normalisers hold them as buffers)
      model/             vlakit.json + model.safetensors (vlakit.persistence)
      tokenizer/         the tokenizer's own files (save_pretrained)

Nothing is pickled: the processor is rebuilt from its class (one of vlakit's processors)
and its arguments, with the model's own preprocessing.
"""

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlakit.core import CheckpointError
from vlakit.heads import Sampling
from vlakit.persistence import load_model, save_model
from vlakit.processors import OpenVLAProcessor, PaliGemmaProcessor, Pi0Processor, Pi05Processor

__all__ = ["ObservationKeys", "PolicyBundle", "POLICY_FILE"]

POLICY_FILE = "policy.json"
_FORMAT = "vlakit.policy"
_PROCESSORS = (OpenVLAProcessor, PaliGemmaProcessor, Pi0Processor, Pi05Processor)


@dataclasses.dataclass(frozen=True)
class ObservationKeys:
    """Which keys of an observation dict the policy reads.

    Attributes:
        images: one key per camera view, in the model's view order. An observation may
            hold ``None`` under a camera key: that camera is absent and masked out of the
            sequence (LeRobot's and openpi's image masks); the key itself must be there.
        state: the proprioceptive state vector's key (``None``: the model takes none).
        prompt: the instruction string's key.
    """

    images: tuple[str, ...]
    state: str | None = None
    prompt: str = "prompt"

    def __post_init__(self) -> None:
        images = (self.images,) if isinstance(self.images, str) else tuple(self.images)
        if not images:
            raise ValueError("ObservationKeys.images needs at least one camera key")
        if len(set(images)) != len(images):
            raise ValueError(f"ObservationKeys.images repeats a key: {list(images)}")
        object.__setattr__(self, "images", images)

    @property
    def all(self) -> tuple[str, ...]:
        """Every key an observation must carry."""
        return self.images + ((self.state,) if self.state else ()) + (self.prompt,)

    @classmethod
    def for_model(cls, model: Any) -> "ObservationKeys":
        """openpi's LIBERO example keys, as many as ``model`` reads:
        ``observation/image``, then ``observation/wrist_image``, then
        ``observation/image_{k}`` for more views; ``observation/state`` when the model reads
        the state (a proprio projector, a [ProprioHead][vlakit.heads.ProprioHead], or a
        proprio normaliser for a state written into the prompt: pi0.5); ``prompt``. A model
        that declares no view count gets one camera key."""
        views = model.num_views or 1
        names = ["observation/image", "observation/wrist_image"]
        names += [f"observation/image_{k}" for k in range(2, views)]
        reads_state = model.takes_proprio or model.proprio_normalizer is not None
        state = "observation/state" if reads_state else None
        return cls(images=tuple(names[:views]), state=state, prompt="prompt")


def _statistics(normalizer: Any) -> dict[str, list] | None:
    if normalizer is None:
        return None
    return {name: buffer.detach().cpu().tolist() for name, buffer in normalizer.named_buffers()}


class PolicyBundle:
    """A model and everything needed to feed it raw observations.

    Args:
        model: the [VLA][vlakit.VLA] (with an action head).
        processor: the model's processor
            ([OpenVLAProcessor][vlakit.processors.OpenVLAProcessor] or
            [PaliGemmaProcessor][vlakit.processors.PaliGemmaProcessor]), built for it with
            ``from_model``.
        keys: the observation keys the policy reads.

    The number of camera keys must equal the model's ``num_views`` when it declares one;
    a policy that reads the state (the model's ``takes_proprio``, or pi0.5's processor,
    which writes it into the prompt) needs a state key, one that does not refuses it.
    """

    def __init__(self, model: Any, processor: Any, keys: ObservationKeys) -> None:
        if not isinstance(processor, _PROCESSORS):
            raise TypeError(
                f"processor must be one of vlakit's processors "
                f"({', '.join(p.__name__ for p in _PROCESSORS)}), got {type(processor).__name__}"
            )
        if model.num_views is not None and model.num_views != len(keys.images):
            raise ValueError(
                f"the model reads {model.num_views} camera view(s) but the observation keys "
                f"name {len(keys.images)}: {list(keys.images)}"
            )
        reads_state = model.takes_proprio or isinstance(processor, Pi05Processor)
        if reads_state == (keys.state is None):
            raise ValueError(
                f"ObservationKeys.state={keys.state!r}, but the policy "
                f"{'reads' if reads_state else 'does not read'} the robot state: name the "
                f"state key exactly when the model (a proprio projector or a head that takes "
                f"the state) or its processor (pi0.5's state prompt) reads it"
            )
        self.model, self.processor, self.keys = model, processor, keys

    # -- observations to actions -------------------------------------------------------------

    def _pixels(
        self, observations: Sequence[Mapping[str, Any]]
    ) -> tuple[Tensor, Tensor | None]:
        """The batch's pixels ``[b, v, c, h, w]`` and, when a camera is absent (``None``)
        anywhere, ``view_valid [b, v]`` (absent views: a black image, masked out)."""
        encoder = self.model.encoder
        height, width = encoder.image_size
        black = np.zeros((height, width, 3), dtype=np.uint8)
        rows, present = [], []
        for obs in observations:
            flags = [obs[key] is not None for key in self.keys.images]
            views = [self._view(encoder.preprocess, obs[key] if ok else black, key)
                     for key, ok in zip(self.keys.images, flags)]
            rows.append(torch.cat(views, 0))  # [v, c, h, w]
            present.append(flags)
        view_valid = torch.tensor(present, dtype=torch.bool)
        return torch.stack(rows), None if bool(view_valid.all()) else view_valid

    @staticmethod
    def _view(preprocess, image: Any, key: str) -> Tensor:
        # one camera image: PIL resized by PIL, arrays and tensors (HWC or CHW) by torch,
        # exactly as the processor treats them
        pixels = preprocess(image)
        if pixels.dim() != 4 or pixels.shape[0] != 1:
            raise ValueError(f"{key!r} must hold one image ([H, W, 3], [3, H, W] or PIL), got "
                             f"preprocessed shape {tuple(pixels.shape)}")
        return pixels

    def _check(self, obs: Mapping[str, Any], index: int) -> None:
        if not isinstance(obs, Mapping):
            raise TypeError(f"observation {index} must be a dict, got {type(obs).__name__}")
        missing = [k for k in self.keys.all if k not in obs]
        if missing:
            raise KeyError(
                f"observation {index} lacks {missing}; the policy reads {list(self.keys.all)}, "
                f"the observation has {sorted(obs)}"
            )
        unknown = sorted(k for k in obs if k not in self.keys.all)
        if unknown:
            raise KeyError(
                f"observation {index} has keys the policy does not read: {unknown} (it reads "
                f"{list(self.keys.all)}); drop them, or name them in ObservationKeys"
            )
        if not isinstance(obs[self.keys.prompt], str):
            raise TypeError(f"observation {index}: {self.keys.prompt!r} must be a string, got "
                            f"{type(obs[self.keys.prompt]).__name__}")

    def inputs(self, observations: Sequence[Mapping[str, Any]]) -> Any:
        """The model batch ([VLAInputs][vlakit.VLAInputs]) for raw observation dicts."""
        for i, obs in enumerate(observations):
            self._check(obs, i)
        prompts = [obs[self.keys.prompt] for obs in observations]
        proprio = None
        if self.keys.state is not None:
            proprio = np.stack([np.asarray(obs[self.keys.state], dtype=np.float32).reshape(-1)
                                for obs in observations])
        device = next(self.model.parameters()).device
        pixels, view_valid = self._pixels(observations)
        batch = self.processor(None, prompts, proprio=proprio, pixels=pixels,
                               view_valid=view_valid)
        return batch.to(device)

    def __call__(
        self,
        observation: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        sampling: Sampling | None = None,
    ) -> np.ndarray:
        """Unnormalised actions for one observation ``[chunk, a]`` or a list of them
        ``[b, chunk, a]`` (float32 numpy)."""
        single = isinstance(observation, Mapping)
        observations = [observation] if single else list(observation)
        actions = self.model.predict_action(self.inputs(observations), sampling)
        actions = actions.float().cpu().numpy()
        return actions[0] if single else actions

    # -- persistence -------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What ``policy.json`` holds."""
        model, head = self.model, self.model.head
        encoder = model.encoder
        return {
            "format": _FORMAT,
            "processor": {"class": type(self.processor).__name__,
                          "args": self.processor.config()},
            "observation": dataclasses.asdict(self.keys),
            "image_size": list(encoder.image_size),
            "num_views": len(self.keys.images),
            "proprio_dim": self._proprio_dim(),
            "action": {"chunk_size": head.chunk_size, "action_dim": head.action_dim},
            "statistics": {"action": _statistics(model.action_normalizer),
                           "proprio": _statistics(model.proprio_normalizer)},
        }

    def _proprio_dim(self) -> int | None:
        model = self.model
        if model.proprio_projector is not None:
            return getattr(model.proprio_projector, "in_dim", None)
        normalizer = model.proprio_normalizer
        return None if normalizer is None else getattr(normalizer, "dim", None)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle to the directory ``path`` (see the module docstring)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        description = self.describe()  # fails before anything is written
        save_model(self.model, path / "model")
        self.processor.tokenizer.save_pretrained(str(path / "tokenizer"))
        (path / POLICY_FILE).write_text(json.dumps(description, indent=1))
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        trust: tuple[str, ...] = (),
    ) -> "PolicyBundle":
        """Load a bundle written by [save][vlakit.bundle.PolicyBundle.save]: the model
        (strictly, see [load_model][vlakit.persistence.load_model]), the tokenizer
        (``AutoTokenizer``) and the processor rebuilt for the model. The model is put in
        eval mode."""
        from transformers import AutoTokenizer

        path = Path(path)
        file = path / POLICY_FILE
        if not file.is_file():
            raise CheckpointError(f"{path} has no {POLICY_FILE}: not a policy bundle "
                                  f"(PolicyBundle.save writes one)")
        data = json.loads(file.read_text())
        if data.get("format") != _FORMAT:
            raise CheckpointError(f"{file} is not a vlakit policy (format "
                                  f"{data.get('format')!r})")
        by_name = {p.__name__: p for p in _PROCESSORS}
        name = data["processor"]["class"]
        if name not in by_name:
            raise CheckpointError(f"{file} names processor {name!r}; vlakit's are "
                                  f"{sorted(by_name)}")
        model, _ = load_model(path / "model", device=device, dtype=dtype, trust=trust)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        processor = by_name[name].from_model(tokenizer, model, **data["processor"]["args"])
        observation = data["observation"]
        keys = ObservationKeys(images=tuple(observation["images"]), state=observation["state"],
                               prompt=observation["prompt"])
        return cls(model, processor, keys)
