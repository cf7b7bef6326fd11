"""FSDP2 applied by hand (world size 1, gloo), torchtitan's habit: ``fully_shard`` per layer,
then the decoder or the root, instead of ``vlakit.distributed.fully_shard_vla``.

Run by tests/test_fsdp_manual.py in a fresh process (a process group is process-wide state).
What works by hand trains to the unsharded numbers; what cannot work (a method vlakit runs
outside ``forward`` on a unit whose parameters are still sharded) raises a message that
names the method and points at ``fully_shard_vla``, not DTensor's "mixed torch.Tensor and
DTensor". Exits non-zero with a message on any difference.
"""

import copy
import functools
import inspect
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from fsdp_world1 import batch, build, training_step_matches  # noqa: E402

from vlakit import VLA, VLAInputs  # noqa: E402
from vlakit.core import check_gathered
from vlakit.decoders import TransformerDecoder  # noqa: E402
from vlakit.distributed import fully_shard_vla  # noqa: E402

# The methods vlakit runs outside a module's forward, each with the submodule it calls
# (None: the module's parameters at large)
ENTRY_POINTS = ((VLA, {"predict_action": None, "generate": None, "runner": None}),
                (TransformerDecoder, {"embed_tokens": "embed", "logits": "lm_head"}))


def install_checks() -> list[str]:
    """The ``check_gathered`` call each entry point makes first, patched in where this
    checkout's method does not make it (yet); returns the patched names."""
    patched = []
    for cls, names in ENTRY_POINTS:
        for name, uses in names.items():
            original = getattr(cls, name)
            if "check_gathered" in inspect.getsource(original):
                continue

            @functools.wraps(original)
            def checked(self, *args, _original=original, _name=name, _uses=uses, **kwargs):
                check_gathered(self, _name, None if _uses is None else getattr(self, _uses))
                return _original(self, *args, **kwargs)

            setattr(cls, name, checked)
            patched.append(f"{cls.__name__}.{name}")
    return patched


def expect_error(what: str, call, *needles: str) -> None:
    try:
        call()
    except RuntimeError as error:
        message = str(error)
        missing = [n for n in needles if n not in message]
        assert not missing, f"{what}: the message lacks {missing}: {message}"
        assert "mixed torch.Tensor and DTensor" not in message, message
        return
    raise AssertionError(f"{what}: no error")


def prompt_only(inputs: VLAInputs) -> VLAInputs:
    return VLAInputs(input_ids=inputs.input_ids, text_valid=inputs.text_valid,
                     pixels=inputs.pixels)


def layers_then_root() -> None:
    """torchtitan's habit: every block, then the root. Training runs inside the root's
    forward and equals the unsharded model; prediction runs outside it and is refused."""
    reference = build(tied=False)
    sharded = copy.deepcopy(reference)
    for block in sharded.encoder.blocks:
        fully_shard(block)
    for layer in sharded.decoder.layers:
        fully_shard(layer)
    fully_shard(sharded)
    training_step_matches(reference, sharded, batch())
    predict = prompt_only(batch())
    for name, call in (("predict_action", lambda: sharded.predict_action(predict)),
                       ("generate", lambda: sharded.generate(predict, 2))):
        expect_error(name, call, f"VLA.{name} runs outside VLA.forward",
                     "vlakit.distributed.fully_shard_vla", f"register_fsdp_forward_method"
                     f"(module, '{name}')")
    print("layers then root: a training step equals the unsharded one; predict_action and "
          "generate name fully_shard_vla")


def layers_then_decoder_then_root() -> None:
    """The decoder sharded as a whole: the prompt is embedded outside its forward (the
    interleaver calls embed_tokens first), so the step is refused, naming embed_tokens."""
    sharded = build(tied=True)
    for layer in sharded.decoder.layers:
        fully_shard(layer)
    fully_shard(sharded.decoder)
    fully_shard(sharded)
    expect_error("embed_tokens", lambda: sharded(batch()),
                 "TransformerDecoder.embed_tokens runs outside TransformerDecoder.forward",
                 "vlakit.distributed.fully_shard_vla")
    print("layers, decoder, root: the step names embed_tokens and fully_shard_vla")


def ends_as_units() -> None:
    """torchtitan's own split: the embedding, each layer and the LM head as units, then the
    root (or the decoder, then the root). Every end runs as a module of its own, so
    training equals the unsharded model, and no check fires."""
    for decoder_unit in (False, True):
        reference = build(tied=False)
        sharded = copy.deepcopy(reference)
        fully_shard(sharded.decoder.embed)
        for layer in sharded.decoder.layers:
            fully_shard(layer)
        fully_shard(sharded.decoder.lm_head)
        if decoder_unit:  # its own group keeps the final norm only
            fully_shard(sharded.decoder)
        fully_shard(sharded)
        training_step_matches(reference, sharded, batch())
    print("embedding, layers, LM head, root: a training step equals the unsharded one")


def fully_shard_vla_passes_every_check() -> None:
    """No check fires where fully_shard_vla registered the entry points."""
    reference = build(tied=True)
    sharded = fully_shard_vla(copy.deepcopy(reference))
    training_step_matches(reference, sharded, batch())
    predict = prompt_only(batch())
    torch.testing.assert_close(sharded.predict_action(predict),
                               reference.predict_action(predict), rtol=0, atol=0)
    torch.testing.assert_close(sharded.generate(predict, 2), reference.generate(predict, 2),
                               rtol=0, atol=0)
    print("fully_shard_vla: training, predict_action and generate pass every check")


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        patched = install_checks()
        print(f"checks patched in: {', '.join(patched) or 'none (vlakit makes them)'}")
        layers_then_root()
        layers_then_decoder_then_root()
        ends_as_units()
        fully_shard_vla_passes_every_check()
    finally:
        dist.destroy_process_group()
    print("manual FSDP2 OK")


if __name__ == "__main__":
    main()
