"""torch.compile(fullgraph=True): DecoderLayer, ViTBlock, TransformerDecoder, whole
VLA.forward passes (own decoder, own ViT: OpenVLA's, PaliGemma's and pi0-style layouts) and
greedy generation with a preallocated cache."""

import os
import subprocess
import sys

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def test_hot_paths_compile_without_graph_breaks_and_match_eager():
    # A fresh process without VLAKIT_TYPECHECK: beartype's wrappers are not traceable.
    env = {k: v for k, v in os.environ.items() if k != "VLAKIT_TYPECHECK"}
    done = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "compile_fullgraph.py")],
        capture_output=True, text=True, timeout=900, env=env,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    for line in ("TransformerDecoder: fullgraph OK", "compiled once", "ViTBlock: fullgraph OK",
                 "VLA.forward: fullgraph OK", "role-block VLA: fullgraph OK",
                 "FastV with a tap): fullgraph OK", "length_multiple: the decoder compiled once",
                 "compile_blocks: loss and gradients equal eager",
                 "oft_lora + compile_blocks: loss and gradients equal eager", "COMPILE OK"):
        assert line in out, out[-4000:]
