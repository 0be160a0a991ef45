"""Throughput of one full GRPO step on a Qwen2.5-VL-3B-sized model (random weights, one GPU, bf16).

Phases, each guarded (a failing phase prints why; the others still report):

1. build: policy + frozen reference built directly on the GPU in bf16 (never on the CPU first);
2. GRPO step at group size 8 (2 prompts x 8 completions, two 448x448 images per prompt, 256 new
   tokens): rollout (lgrpo.rollout.engine, the default --rollout.engine), listener-style scoring (a forward of the
   frozen model at the last position + listener_confidence), reference log-probs, the policy update
   with linear_grpo_loss and AdamW; time per phase, tokens/s, peak memory;
3. update at 8 x 1024 text tokens (forward+backward through the scorer with linear_grpo_loss), to
   compare with SPEC §4: 349 ms backbone-only / 391 ms with full logits (HF transformers 5.17, SDPA);
4. generate 16 prompts x 256 new tokens, text only, to compare with SPEC §4: 337 tok/s; the same with
   rollout.static_cache (on CUDA a compiled decode step: SPEC §4 measured 1690 tok/s, first call 60 s);
   plain HF do_sample on the same prompts, which separates HF's per-step cost from our sampler's.

TFLOP/s counts 6 x (language-model parameters) x tokens for forward+backward (the vision tower is
left out). Without CUDA (or with --smoke) a tiny model runs the same code for a few seconds.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, arg_parser, environment, print_table, write_json  # noqa: E402

from lgrpo.group import GroupBatch, PromptBatch  # noqa: E402
from lgrpo.rewards import Rewards  # noqa: E402

GiB = 1024**3
ANCHORS = {"update_8x1024_backbone_ms": 349.0, "update_8x1024_full_logits_ms": 391.0, "generate_tok_s": 337.0}


def qwen25vl_3b_config(smoke: bool):
    from transformers import Qwen2_5_VLConfig

    if smoke:
        text = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
        )
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
        )
    else:  # Qwen2.5-VL-3B-Instruct's shapes
        text = dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
        )
        vision = dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            fullatt_block_indexes=[7, 15, 23, 31],
        )
    vision.update(
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        in_chans=3,
        tokens_per_second=2,
        hidden_act="silu",
    )
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            text,
            max_position_embeddings=32768,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}
            if not smoke
            else {"type": "mrope", "mrope_section": [2, 3, 3]},
        ),
        vision_config=vision,
        image_token_id=151655 if not smoke else 1000,
        video_token_id=151656 if not smoke else 1001,
        vision_start_token_id=151652 if not smoke else 1002,
        vision_end_token_id=151653 if not smoke else 1003,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


# The other families (lgrpo.models) at a 3B/4B size: Qwen3-VL-4B's published shapes; Qwen2-VL with
# Qwen2.5-VL-3B's text model and Qwen2-VL's own vision tower (its 2B/7B are not among the presets).
_QWEN2_VL_3B = {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
                "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
                "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 2048, "mlp_ratio": 4,
                                  "num_heads": 16, "hidden_act": "quick_gelu"}}


def family_config(model_type: str, smoke: bool):
    """The benchmark's config of a family: Qwen2.5-VL's above (the anchors' model); another family's from
    its tiny folder's config.json (its structure and token ids), at full size with the shapes above."""
    import json

    from lgrpo.models import family_named

    if model_type == "qwen2_5_vl":
        return qwen25vl_3b_config(smoke)
    family = family_named(model_type)
    raw = json.loads((family.tiny / "config.json").read_text(encoding="utf-8"))
    if not smoke:
        full = family.published["qwen3-vl-4b"] if model_type == "qwen3_vl" else _QWEN2_VL_3B
        for key, value in full.items():
            raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    cfg = family.config_class()(**{k: v for k, v in raw.items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(cfg, device: torch.device, dtype: torch.dtype):
    """Random weights of the config's family, allocated on ``device`` in ``dtype`` from the start."""
    from lgrpo.models import family_named

    model_class = family_named(cfg.model_type).model_class()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class._from_config(cfg, dtype=dtype)
    finally:
        torch.set_default_dtype(default)
    return model.to(device=device, dtype=dtype)


class StubTokenizer:
    """What rollouts need from a tokenizer when there is no text to read (random weights)."""

    pad_token_id = 0
    eos_token_id = None  # never stop early: every completion runs to max_new_tokens, a fixed workload

    def batch_decode(self, ids, skip_special_tokens=True):
        return [""] * len(ids)

    def get_vocab(self):
        return {}  # no special tokens, so no stop tokens: lgrpo.prompts.stop_token_ids is empty


class BenchTask:
    """Prompts with two images each; rewards from a listener-style forward of the frozen model."""

    def __init__(
        self, cfg, listener_model, *, n_prompts: int, image_side: int, text_tokens: int, seed: int = 0
    ):
        self.tokenizer = StubTokenizer()
        self.cfg, self.listener_model = cfg, listener_model
        self.listener = None
        self.n, self.seed = n_prompts, seed
        self.grid = image_side // cfg.vision_config.patch_size
        self.text_tokens = text_tokens

    def num_prompts(self, split):
        return self.n

    def prompts(self, split, indices, swap=None):
        cfg, g = self.cfg, self.grid
        merge = cfg.vision_config.spatial_merge_size
        per_image = (g // merge) ** 2
        gen = torch.Generator().manual_seed(self.seed)
        vocab = cfg.text_config.vocab_size if hasattr(cfg, "text_config") else cfg.vocab_size
        rows = []
        for _ in indices:
            text = torch.randint(100, min(vocab, 150000) - 100, (self.text_tokens,), generator=gen).tolist()
            img = [cfg.vision_start_token_id] + [cfg.image_token_id] * per_image + [cfg.vision_end_token_id]
            rows.append(text[: self.text_tokens // 2] + img + img + text[self.text_tokens // 2 :])
        ids = torch.tensor(rows)
        patch_dim = 3 * cfg.vision_config.temporal_patch_size * cfg.vision_config.patch_size**2
        n_img = 2 * len(indices)
        return PromptBatch(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == cfg.image_token_id).int(),
            pixel_values=torch.randn(n_img * g * g, patch_dim, generator=gen),
            image_grid_thw=torch.tensor([[1, g, g]] * n_img),
            images_per_row=torch.full((len(indices),), 2),
        )

    @torch.no_grad()
    def rewards(self, rollout):
        from lgrpo.ops import listener_confidence
        from lgrpo.scoring import CompletionScorer

        if self.listener is None:
            self.listener = CompletionScorer(self.listener_model, fused=False)

        # The listener's cost: each prompt once + every completion, lm_head at the last position only.
        logits = self.listener(rollout, last_logits=True)
        probs, _ = listener_confidence(logits, None, torch.tensor([16, 17], device=logits.device))
        gen = torch.Generator().manual_seed(len(rollout))
        fmt = (torch.rand(len(rollout), generator=gen) < 0.5).float()
        acc = (torch.rand(len(rollout), generator=gen) < 0.5).float()
        lst = probs[:, 0].float().cpu()
        return Rewards(total=fmt + 0.5 * acc + 0.5 * lst, format=fmt, accuracy=acc, listener=lst)


def lm_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)


def run_grpo_step(cfg, policy, reference, *, device, cuda: bool, new_tokens: int, micro_batch: int,
                  image_side: int, label: str = "") -> tuple[dict, list[Row]]:
    """Two GRPO steps through the real Trainer (2 prompts x G = 8, two images each); the second is measured.
    Returns its metrics and its rows (``label`` names the family in them)."""
    from lgrpo import distributed as D
    from lgrpo.config import build_config
    from lgrpo.trainer import Models, Trainer

    jc = build_config(
        "tiny",
        {
            "model": {"dtype": "bfloat16" if cuda else "float32", "master_weights": "compute"},
            "rollout": {"group_size": 8, "max_new_tokens": new_tokens, "temperature": 1.0, "stop": ""},
            "loss": {"beta": 0.04, "micro_batch_size": micro_batch, "fused": True},
            "optim": {"lr": 1e-6, "warmup_steps": 0, "schedule": "constant"},
            "train": {"steps": 2, "prompts_per_step": 2},
            "data": {"synthetic_train_size": 2},
            "checkpoint": {"interval": 0},
            "run": {"progress": False, "tensorboard": "off"},
        },
    )
    task = BenchTask(cfg, reference, n_prompts=2, image_side=image_side, text_tokens=64)
    trainer = Trainer(jc, D.Dist(device=device), task, Models(policy, reference), tempfile.mkdtemp())
    # First step: allocations, the optimizer state, cuBLAS/SDPA autotuning. Second step: measured.
    trainer.cfg.rollout.max_new_tokens = min(16, new_tokens)  # short: the warm-up only has to allocate
    trainer.train_step()
    trainer.cfg.rollout.max_new_tokens = new_tokens
    trainer.step += 1
    m = trainer.train_step()
    secs = {k: m[f"time/{k}"] for k in ("rollout", "reward", "reference", "update")}
    vision = cfg.vision_config
    prompt_len = task.text_tokens + 2 * ((image_side // vision.patch_size // vision.spatial_merge_size) ** 2 + 2)
    upd_tokens = 16 * (prompt_len + m["completion_len"])
    tflops = 6 * lm_params(policy) * upd_tokens / max(secs["update"], 1e-9) / 1e12
    name = f"GRPO step{f' {label}' if label else ''} (2 prompts x G=8, 2 images each)"
    rows = [
        Row(name, m["time/step"] * 1e3, extra_gib=m["peak_mem_gib"],
            note=f"rollout {secs['rollout']:.1f}s reward {secs['reward']:.2f}s "
            f"ref {secs['reference']:.2f}s update {secs['update']:.2f}s"),
        Row("  rollout (lgrpo.rollout.engine)", secs["rollout"] * 1e3,
            note=f"{m['tokens_per_s/rollout']:.0f} tok/s, {new_tokens} new tokens x 16"),
        Row("  policy update (linear_grpo_loss + AdamW)", secs["update"] * 1e3,
            note=f"{m['tokens_per_s/update']:.0f} tok/s, {tflops:.0f} TFLOP/s (6ND, LM only)"),
    ]
    return m, rows


def main(argv=None) -> int:
    p = arg_parser(__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--family", default="qwen2_5_vl", choices=("qwen2_5_vl", "qwen2_vl", "qwen3_vl"),
                   help="the model family (lgrpo.models); another than qwen2_5_vl times the GRPO step only, "
                        "into train_step_FAMILY.json")
    args = p.parse_args(argv)
    name = "train_step" if args.family == "qwen2_5_vl" else f"train_step_{args.family}"
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    new_tokens = args.new_tokens or (8 if smoke else 256)
    env = environment()
    rows: list[Row] = []
    phases: dict[str, object] = {"smoke": smoke}

    def guarded(name, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
            print(f"[{name}] done in {time.perf_counter() - t0:.1f}s", flush=True)
            return out
        except Exception as exc:  # noqa: BLE001 - a phase must report, not end the benchmark
            traceback.print_exc()
            print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
            rows.append(Row(name, float("nan"), note=f"failed: {type(exc).__name__}: {str(exc)[:90]}"))
            phases[name] = f"failed: {type(exc).__name__}: {exc}"
            if cuda:
                torch.cuda.empty_cache()
            return None
        finally:  # what is measured so far survives a timeout of a later phase
            write_json(args.out, name, {"title": "GRPO train step", "env": env, "rows": rows, "phases": phases})

    cfg = family_config(args.family, smoke)

    def build():
        t0 = time.perf_counter()
        policy = build_model(cfg, device, dtype)
        reference = copy.deepcopy(policy).requires_grad_(False).eval()
        phases["build_s"] = time.perf_counter() - t0
        phases["lm_params"] = lm_params(policy)
        phases["params"] = sum(p.numel() for p in policy.parameters())
        return policy, reference

    built = guarded("build", build)
    if built is None:
        write_json(args.out, name, {"title": "GRPO train step", "env": env, "rows": rows, "phases": phases})
        return 1
    policy = built[0]
    frozen = {"reference": built[1]}  # dropped after the GRPO step
    del built
    n_lm = phases["lm_params"]
    # 2 x 2 (smoke) or 16 x 16 visual tokens per image: 56 / 448 px for 14-px patches, 64 / 512 for 16-px
    unit = cfg.vision_config.patch_size * cfg.vision_config.spatial_merge_size
    image_side = unit * (2 if smoke else 16)

    def grpo_step():
        m, step_rows = run_grpo_step(cfg, policy, frozen["reference"], device=device, cuda=cuda,
                                     new_tokens=new_tokens, micro_batch=args.micro_batch, image_side=image_side,
                                     label="" if args.family == "qwen2_5_vl" else args.family)
        phases["grpo_step"] = m
        rows.extend(step_rows)

    guarded("grpo_step", grpo_step)
    if args.family != "qwen2_5_vl":  # another family: its full step, beside the Qwen2.5-VL one in the same run
        title = f"GRPO train step, {args.family} (random weights)" + (" [smoke]" if smoke else "")
        print_table(title, rows, env)
        write_json(args.out, name, {"title": title, "env": env, "rows": rows, "phases": phases})
        return 0 if all(r.ms == r.ms for r in rows) else 1
    frozen.clear()  # frees the reference for the next phases (SPEC's anchors hold the policy only)
    if cuda:
        torch.cuda.empty_cache()

    def update_8x1024():
        from lgrpo.scoring import CompletionScorer

        scorer = CompletionScorer(policy, fused=True)
        B, T = (8, 1024) if not smoke else (2, 64)
        vocab = (
            policy.config.text_config.vocab_size
            if hasattr(policy.config, "text_config")
            else policy.config.vocab_size
        )
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(100, min(vocab, 150000) - 100, (B, T), generator=gen).to(device)
        prompt = PromptBatch(ids[:, :1], torch.ones_like(ids[:, :1]))
        comp, mask = ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.bool)
        batch = GroupBatch.grouped(prompt, comp, mask, 1)
        adv = torch.randn(B, generator=gen).to(device)

        def step():
            loss = scorer(batch, loss={"advantages": adv, "loss_type": "dapo"})[0]
            loss.backward()
            policy.zero_grad(set_to_none=True)

        step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        ms = sorted(times)[1] * 1e3
        peak = torch.cuda.max_memory_allocated() / GiB if cuda else None
        tflops = 6 * n_lm * B * T / (ms / 1e3) / 1e12
        phases["update_8x1024"] = {"ms": ms, "tflops": tflops, "peak_gib": peak}
        rows.append(
            Row(
                f"update fwd+bwd {B}x{T} (linear_grpo_loss)",
                ms,
                extra_gib=peak,
                ratio=ms / ANCHORS["update_8x1024_backbone_ms"] if not smoke else None,
                note=f"{tflops:.0f} TFLOP/s; SPEC: 349 ms backbone only, 391 ms full logits",
            )
        )

    guarded("update_8x1024", update_8x1024)

    def text_prompts():
        """The generate phases' prompts: n rows of 64 random text tokens, and the new tokens to make."""
        n, new = (16, 256) if not smoke else (4, 8)
        gen = torch.Generator().manual_seed(1)
        return n, new, torch.randint(100, 150000 if not smoke else 900, (n, 64), generator=gen).to(device)

    def generate_16x256():
        from lgrpo.rollout.hf import clean_generation_config, generate

        tok = StubTokenizer()
        clean_generation_config(policy, tok)
        n, new, ids = text_prompts()
        prompt = PromptBatch(ids, torch.ones_like(ids))
        generate(policy, tok, prompt, max_new_tokens=4, stop=None, seed=0)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(policy, tok, prompt, max_new_tokens=new, stop=None, seed=0)
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        tok_s = float(out.completion_mask.sum()) / secs
        phases["generate_16x256"] = {"s": secs, "tok_s": tok_s}
        rows.append(
            Row(
                f"generate {n} x {new} new tokens (text)",
                secs * 1e3,
                ratio=ANCHORS["generate_tok_s"] / tok_s if not smoke else None,
                note=f"{tok_s:.0f} tok/s; SPEC: HF generate 337 tok/s",
            )
        )

    guarded("generate_16x256", generate_16x256)


    def hf_generate_16x256():
        """Plain HF sampling on the same prompts: separates HF's per-step cost from our sampler's."""
        from transformers import GenerationConfig

        n, new, ids = text_prompts()
        cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0,
                               top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)
        policy.eval()
        with torch.no_grad():
            policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                            generation_config=GenerationConfig(max_new_tokens=4, do_sample=True, pad_token_id=0))
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
            if cuda:
                torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        tok_s = (out.shape[1] - ids.shape[1]) * n / secs
        phases["hf_generate_16x256"] = {"s": secs, "tok_s": tok_s}
        rows.append(Row(f"HF generate {n} x {new}, plain do_sample", secs * 1e3,
                        ratio=ANCHORS["generate_tok_s"] / tok_s if not smoke else None,
                        note=f"{tok_s:.0f} tok/s (same run: our sampler's overhead = the row above / this)"))

    guarded("hf_generate_16x256", hf_generate_16x256)

    def generate_static_16x256():
        """The same rollout with rollout.static_cache: on CUDA transformers compiles the decode step."""
        from lgrpo.rollout.hf import generate

        tok = StubTokenizer()
        n, new, ids = text_prompts()
        prompt = PromptBatch(ids, torch.ones_like(ids))
        kw = dict(max_new_tokens=new, stop=None, seed=0, static_cache=True)
        t0 = time.perf_counter()
        generate(policy, tok, prompt, **kw)  # the first call compiles (same shapes as the timed one)
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = generate(policy, tok, prompt, **kw)
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        tok_s = float(out.completion_mask.sum()) / secs
        phases["generate_static_16x256"] = {"s": secs, "tok_s": tok_s, "first_call_s": first}
        rows.append(Row(f"generate {n} x {new}, static KV cache", secs * 1e3,
                        ratio=ANCHORS["generate_tok_s"] / tok_s if not smoke else None,
                        note=f"{tok_s:.0f} tok/s; first call {first:.0f} s; SPEC: 1690 tok/s compiled"))

    guarded("generate_static_16x256", generate_static_16x256)

    title = "GRPO train step, Qwen2.5-VL-3B-sized (random weights)" + (" [smoke]" if smoke else "")
    print_table(title, rows, env)
    write_json(args.out, "train_step", {"title": title, "env": env, "rows": rows, "phases": phases})
    return 0 if all(r.ms == r.ms for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
