#!/usr/bin/env python
"""Build tiny LeRobot pi0 / pi0.5 policies, save them like a LeRobot training checkpoint
(`pretrained_model/` layout: policy + pre/post processors in one directory), dump the
on-disk layout, reload them and run inference.

Run:  LEROBOT_VENV/bin/python tests/data/lerobot_pi0/make_fixtures.py [--heads N]

Everything is offline: the PaliGemma tokenizer ("google/paligemma-3b-pt-224", gated on the
Hub) is replaced by a tiny locally built char-level tokenizer (see build_tiny_tokenizer).

Monkeypatches (applied by install_patches(), needed both for building and for reloading):
  * lerobot.policies.{pi0,pi05}.modeling_{pi0,pi05}.get_gemma_config -> tiny Gemma sizes
    (variant names stay "gemma_2b" / "gemma_300m" because PI0Config.__post_init__ only
    accepts those two strings).
  * lerobot.policies.{pi0,pi05}.modeling_*.PaliGemmaForConditionalGenerationWithPiGemma ->
    subclass that shrinks the SigLIP vision config and the vocabulary before building
    (PaliGemmaWithExpertModel.__init__ hard-codes vision intermediate_size=4304,
    projection_dim=2048, and vocab 257152; SigLIP hidden/layers/heads come from the HF
    PaliGemmaConfig defaults 1152/27/16).
  * lerobot.policies.{pi0,pi05}.modeling_*.PiGemmaForCausalLM -> subclass that shrinks the
    action expert vocab (hard-coded vocab_size=257152 in PaliGemmaWithExpertModel.__init__).
  * transformers.AutoTokenizer.from_pretrained: "google/paligemma-3b-pt-224" -> local tiny
    tokenizer dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REF = Path(__file__).resolve().parent
TOK_DIR = REF / "tokenizer"
PALIGEMMA_TOKENIZER_NAME = "google/paligemma-3b-pt-224"

# ---- tiny sizes -----------------------------------------------------------------------
VOCAB = 256
LM = dict(width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=16)
EXPERT = dict(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
IMAGE_RES = 28  # -> (28/14)^2 = 4 image tokens per camera
CAMERAS = ["observation.images.base_0_rgb", "observation.images.left_wrist_0_rgb"]
CAM_SHAPE = (3, 24, 32)  # declared (and fed) image shape; != 28x28 so resize_with_pad is exercised
STATE_DIM = 8
ACTION_DIM = 7
CHUNK = 4
SUFFIX = ""  # set from --suffix


# ---- tokenizer ------------------------------------------------------------------------
def build_tiny_tokenizer(path: Path = TOK_DIR):
    """Char-level tokenizer with PaliGemma-like specials: <pad>=0, <eos>=1, <bos>=2, <unk>=3,
    BOS prepended (like the Gemma tokenizer, add_bos_token=True, add_eos_token=False)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
    )
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return fast


# ---- patches --------------------------------------------------------------------------
_PATCHED = False


def install_patches(num_heads: int | None = None):
    global _PATCHED
    if num_heads is not None:
        LM["num_heads"] = EXPERT["num_heads"] = num_heads
    if _PATCHED:
        return
    _PATCHED = True

    import transformers
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05

    # tokenizer
    if not (TOK_DIR / "tokenizer.json").exists():
        build_tiny_tokenizer()
    orig_from_pretrained = transformers.AutoTokenizer.from_pretrained.__func__

    def patched_from_pretrained(cls, name, *args, **kwargs):
        if str(name) == PALIGEMMA_TOKENIZER_NAME:
            name = str(TOK_DIR)
        return orig_from_pretrained(cls, name, *args, **kwargs)

    transformers.AutoTokenizer.from_pretrained = classmethod(patched_from_pretrained)

    for mod in (modeling_pi0, modeling_pi05):
        GemmaConfig = mod.GemmaConfig
        orig_get = mod.get_gemma_config

        def tiny_get_gemma_config(variant, _G=GemmaConfig, _orig=orig_get):
            if variant == "gemma_2b":
                return _G(**LM)
            if variant == "gemma_300m":
                return _G(**EXPERT)
            return _orig(variant)

        mod.get_gemma_config = tiny_get_gemma_config

        base_pali = mod.PaliGemmaForConditionalGenerationWithPiGemma
        base_expert = mod.PiGemmaForCausalLM

        class TinyPali(base_pali):
            def __init__(self, config):
                vc = config.vision_config
                for k, v in VISION.items():
                    setattr(vc, k, v)
                vc.projection_dim = config.text_config.hidden_size  # projector: vision hidden -> LM width
                vc.vocab_size = VOCAB
                config._vocab_size = VOCAB
                config.image_token_index = VOCAB
                config.text_config.vocab_size = VOCAB
                config.text_config.num_image_tokens = (vc.image_size // vc.patch_size) ** 2
                super().__init__(config)

        class TinyExpert(base_expert):
            def __init__(self, config, **kw):
                config.vocab_size = VOCAB
                super().__init__(config, **kw)

        TinyPali.__name__ = base_pali.__name__
        TinyExpert.__name__ = base_expert.__name__
        mod.PaliGemmaForConditionalGenerationWithPiGemma = TinyPali
        mod.PiGemmaForCausalLM = TinyExpert


# ---- config / stats -------------------------------------------------------------------
def make_features():
    from lerobot.configs import FeatureType, PolicyFeature

    inp = {k: PolicyFeature(type=FeatureType.VISUAL, shape=CAM_SHAPE) for k in CAMERAS}
    inp["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))
    out = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))}
    return inp, out


def make_config(kind: str, dtype: str = "float32"):
    inp, out = make_features()
    common = dict(
        input_features=inp,
        output_features=out,
        chunk_size=CHUNK,
        n_action_steps=CHUNK,
        image_resolution=(IMAGE_RES, IMAGE_RES),
        device="cpu",
        dtype=dtype,
        num_inference_steps=3,
    )
    if kind == "pi0":
        from lerobot.policies.pi0 import PI0Config

        return PI0Config(tokenizer_max_length=32, **common)
    from lerobot.policies.pi05 import PI05Config

    return PI05Config(tokenizer_max_length=96, **common)


def make_stats(seed: int = 0):
    """Dataset-stats dict in the shape LeRobot's compute_stats produces (images: (3,1,1))."""
    g = np.random.default_rng(seed)

    def vec_stats(shape):
        mean = g.normal(0, 1, shape).astype(np.float32)
        std = g.uniform(0.5, 2.0, shape).astype(np.float32)
        q = np.sort(g.normal(0, 1, (5, *shape)).astype(np.float32), axis=0)
        q = q * 2.0  # spread
        return {
            "mean": mean,
            "std": std,
            "min": q[0] - 1.0,
            "max": q[-1] + 1.0,
            "q01": q[0],
            "q10": q[1],
            "q50": q[2],
            "q90": q[3],
            "q99": q[4],
            "count": np.array([1000]),
        }

    stats = {k: vec_stats((3, 1, 1)) for k in CAMERAS}
    stats["observation.state"] = vec_stats((STATE_DIM,))
    stats["action"] = vec_stats((ACTION_DIM,))
    return stats


def randomize_constant_params(policy, seed: int):
    """Init leaves RMSNorm weights / adaRMS dense at 0 and LayerNorm at 1/0; add noise to every
    constant-valued parameter so that fixtures exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in policy.named_parameters():
            if p.numel() == 1 or float(p.float().std()) == 0.0:
                p.add_((torch.randn(p.shape, generator=g) * 0.1).to(p.dtype))


# ---- dumping helpers ------------------------------------------------------------------
def safetensors_layout(path: Path):
    from safetensors import safe_open

    rows = []
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        for k in f.keys():
            sl = f.get_slice(k)
            rows.append((k, tuple(sl.get_shape()), sl.get_dtype()))
    return rows, meta


def make_raw_batch(seed: int, bsize: int = 2, drop_camera: str | None = None):
    g = torch.Generator().manual_seed(seed)
    b = {k: torch.rand((bsize, *CAM_SHAPE), generator=g) for k in CAMERAS if k != drop_camera}
    b["observation.state"] = torch.randn((bsize, STATE_DIM), generator=g)
    b["task"] = ["pick up the red cube", "open_the drawer\n"][:bsize]
    return b


# ---- main -----------------------------------------------------------------------------
def build_and_save(kind: str, out_dir: Path, seed: int):
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.pi0 import PI0Policy
    from lerobot.policies.pi05 import PI05Policy

    cls = PI0Policy if kind == "pi0" else PI05Policy
    torch.manual_seed(seed)
    cfg = make_config(kind)
    policy = cls(cfg)
    randomize_constant_params(policy, seed)
    stats = make_stats(seed)
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)

    if out_dir.exists():
        for f in out_dir.iterdir():
            f.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(out_dir)
    pre.save_pretrained(out_dir)
    post.save_pretrained(out_dir)
    # training also writes train_config.json (TrainPipelineConfig.save_pretrained)
    try:
        from lerobot.configs.default import DatasetConfig
        from lerobot.configs.train import TrainPipelineConfig

        TrainPipelineConfig(dataset=DatasetConfig(repo_id="local/tiny"), policy=cfg).save_pretrained(out_dir)
        train_cfg_note = "train_config.json written via TrainPipelineConfig(dataset=DatasetConfig(repo_id='local/tiny'), policy=cfg).save_pretrained(dir)"
    except Exception as e:  # pragma: no cover
        train_cfg_note = f"train_config.json NOT written: {type(e).__name__}: {e}"
    return policy, pre, post, stats, train_cfg_note


def reload_and_run(kind: str, out_dir: Path, seed: int, built_policy):
    from lerobot.configs import PreTrainedConfig
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.pi0 import PI0Policy
    from lerobot.policies.pi05 import PI05Policy

    cls = PI0Policy if kind == "pi0" else PI05Policy
    res = {}
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        policy = cls.from_pretrained(str(out_dir))
    res["from_pretrained_stdout"] = buf.getvalue()
    # compare weights with the built model
    sd0, sd1 = built_policy.state_dict(), policy.state_dict()
    res["state_dict_keys_equal"] = set(sd0) == set(sd1)
    res["max_abs_weight_diff"] = max(float((sd0[k].float() - sd1[k].float()).abs().max()) for k in sd0)

    cfg = PreTrainedConfig.from_pretrained(str(out_dir))
    pre, post = make_pre_post_processors(cfg, pretrained_path=str(out_dir))
    res["pre_steps"] = [type(s).__name__ for s in pre.steps]
    res["post_steps"] = [type(s).__name__ for s in post.steps]

    outs = {}
    for tag, drop in [("full", None), ("missing_wrist", CAMERAS[1])]:
        raw = make_raw_batch(seed, drop_camera=drop)
        batch = pre(dict(raw))
        if tag == "full":
            res["batch_keys_after_pre"] = {
                k: (tuple(v.shape), str(v.dtype)) if torch.is_tensor(v) else repr(v) for k, v in batch.items()
            }
            res["tokens_row0"] = batch["observation.language.tokens"][0].tolist()
            res["attn_row0"] = batch["observation.language.attention_mask"][0].int().tolist()
            tok = pre.steps[[type(s).__name__ for s in pre.steps].index("TokenizerProcessorStep")].input_tokenizer
            res["decoded_row0"] = tok.decode(batch["observation.language.tokens"][0], skip_special_tokens=False)
        torch.manual_seed(seed)
        chunk = policy.predict_action_chunk(batch)
        torch.manual_seed(seed)
        noise = torch.randn(chunk.shape[0], cfg.chunk_size, cfg.max_action_dim)
        images, img_masks = policy._preprocess_images(batch)
        tokens, masks = batch["observation.language.tokens"], batch["observation.language.attention_mask"]
        if kind == "pi0":
            state = policy.prepare_state(batch)
            act = policy.model.sample_actions(images, img_masks, tokens, masks, state, noise=noise.clone())
        else:
            act = policy.model.sample_actions(images, img_masks, tokens, masks, noise=noise.clone())
        act = act[:, :, :ACTION_DIM]
        unnorm = post(act)
        policy.reset()
        torch.manual_seed(seed)
        first = policy.select_action(batch)
        outs[tag] = dict(
            raw={k: v for k, v in raw.items() if torch.is_tensor(v)},
            state_normalized=batch["observation.state"],
            tokens=tokens,
            attention_mask=masks,
            images=images,
            img_masks=img_masks,
            noise=noise,
            actions_normalized=act,
            actions=unnorm,
            predict_chunk=chunk,
            select_action=first,
        )
        res[f"{tag}_img_masks"] = [m.tolist() for m in img_masks]
        res[f"{tag}_chunk_shape"] = tuple(chunk.shape)
        res[f"{tag}_chunk_equals_explicit_noise_run"] = bool(torch.allclose(chunk, act, atol=1e-6))
        res[f"{tag}_select_action_shape"] = tuple(first.shape)
        res[f"{tag}_actions_unnorm_row0_t0"] = [round(x, 5) for x in unnorm[0, 0].tolist()]
        if drop is not None:
            res["missing_cam_image_fill_unique"] = torch.unique(images[-1]).tolist()

    # training forward (uses compute_layer_complete, which hard-codes 8 heads)
    try:
        policy.train()
        raw = make_raw_batch(seed)
        g = torch.Generator().manual_seed(seed + 1)
        raw["action"] = torch.randn((2, CHUNK, ACTION_DIM), generator=g)
        batch = pre(dict(raw))
        torch.manual_seed(seed)
        loss, ld = policy.forward(batch)
        res["train_forward"] = f"OK loss={float(loss.detach()):.6f}"
    except Exception as e:
        res["train_forward"] = f"FAILED {type(e).__name__}: {str(e)[:300]}"
    policy.eval()

    from safetensors.torch import save_file

    flat = {}
    for tag, d in outs.items():
        for k, v in d.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    flat[f"{tag}/raw/{kk}"] = vv.contiguous()
            elif isinstance(v, list):
                for i, vv in enumerate(v):
                    flat[f"{tag}/{k}/{i}"] = vv.contiguous()
            else:
                flat[f"{tag}/{k}"] = v.contiguous()
    save_file(flat, str(REF / f"{kind}_tiny{SUFFIX}_reference_io.safetensors"),
              metadata={"tasks": json.dumps(make_raw_batch(seed)["task"]), "seed": str(seed)})
    return res


def bf16_dtype_layout(kind: str, seed: int):
    """Layout (dtype per key) when config.dtype == 'bfloat16' (not saved as a fixture)."""
    import tempfile

    from lerobot.policies.pi0 import PI0Policy
    from lerobot.policies.pi05 import PI05Policy

    cls = PI0Policy if kind == "pi0" else PI05Policy
    torch.manual_seed(seed)
    p = cls(make_config(kind, dtype="bfloat16"))
    with tempfile.TemporaryDirectory() as d:
        p.save_pretrained(d)
        rows, _ = safetensors_layout(Path(d) / "model.safetensors")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--suffix", default="")
    args = ap.parse_args()
    global SUFFIX
    SUFFIX = args.suffix
    install_patches(num_heads=args.heads)

    import lerobot
    import transformers

    summary = {"lerobot": lerobot.__version__ if hasattr(lerobot, "__version__") else "?",
               "transformers": transformers.__version__, "torch": torch.__version__, "heads": args.heads}
    for kind in ("pi0", "pi05"):
        out_dir = REF / f"{kind}_tiny{args.suffix}"
        policy, pre, post, stats, note = build_and_save(kind, out_dir, args.seed)
        info = {"train_config": note, "files": sorted(f.name for f in out_dir.iterdir())}
        rows, meta = safetensors_layout(out_dir / "model.safetensors")
        info["model_metadata"] = meta
        info["n_keys"] = len(rows)
        info["module_state_dict_keys_not_in_file"] = sorted(set(policy.state_dict()) - {r[0] for r in rows})
        with open(REF / f"keys_{kind}{args.suffix}.txt", "w") as f:
            for k, shp, dt in rows:
                f.write(f"{k}\t{list(shp)}\n")
        info["dtypes"] = sorted({r[2] for r in rows})
        info["normalizer_files"] = {}
        for fn in info["files"]:
            if fn.endswith(".safetensors") and fn != "model.safetensors":
                nrows, _ = safetensors_layout(out_dir / fn)
                info["normalizer_files"][fn] = [(k, list(s), d) for k, s, d in nrows]
        info.update(reload_and_run(kind, out_dir, args.seed, policy))
        bf = bf16_dtype_layout(kind, args.seed)
        info["bf16_dtype_counts"] = {}
        for k, s, d in bf:
            info["bf16_dtype_counts"].setdefault(d, []).append(k)
        info["bf16_dtype_counts"] = {d: {"n": len(v), "float32_examples": v[:0]} if d != "F32" else {"n": len(v), "keys": v}
                                     for d, v in info["bf16_dtype_counts"].items()}
        summary[kind] = info
    with open(REF / f"dump_summary{args.suffix}.json", "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items()
                      if kk not in ("normalizer_files", "bf16_dtype_counts", "from_pretrained_stdout")})
                      for k, v in summary.items()}, indent=1, default=str))
    for kind in ("pi0", "pi05"):
        print(f"--- {kind} from_pretrained stdout ---")
        print(summary[kind]["from_pretrained_stdout"])


if __name__ == "__main__":
    sys.exit(main())
