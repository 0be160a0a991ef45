"""Rollout throughput: lgrpo.rollout.engine beside transformers' generate, Qwen2.5-VL-3B-sized, two images a prompt.

Rows (random bf16 weights, SDPA; every completion runs to the full budget: no EOS, no stop string):
  engine, N rows          lgrpo.rollout.engine.RolloutEngine: N / 8 prompts x G = 8, prefill once per prompt,
                          KV fork, CUDA-graph decode (the timed call is the second one; the first
                          call's time and its graph-capture time are in the note)
  hf do_sample, N rows    transformers generate(do_sample=True) on the prompts repeated G times
  hf static+compile       the same with cache_implementation="static" (transformers compiles the
                          decode step on CUDA; the first call's time is in the note)
  --rollout.engine hf     (smoke only) lgrpo.rollout.hf.generate: generate + the seeded sampler + the
                          host-side stop check, what the trainer ran before the engine
  floor                   the weights (language model, bf16) read once per decode step at this run's
                          copy bandwidth; "+KV" adds the cache rows' keys/values read each step
  vllm, N rows            (smoke only, when vLLM imports) lgrpo.rollout.vllm: each prompt once with n = G,
                          on the tiny model's head_dim-32 variant (vLLM's CPU attention needs >= 32), beside
                          "engine (head_dim 32)", the engine on the same variant; start-up in the note.
                          Skipped (noted in the JSON) without vLLM: it lives in its own venv on CPU
                          (tools/vllm_venv.sh); its GPU wheel is too large to carry to the GPU machine.
The "x floor" column is floor tok/s / row tok/s (1.0 = at the floor).

Without CUDA (or with --smoke) the tiny built-in Qwen2.5-VL runs the same rows (8 rows x 8 tokens
unless --rows/--new-tokens say otherwise), the sampler's PyTorch twin standing in for the Triton
kernel: CPU numbers, for the ratio engine / hf only. ``same_greedy_tokens`` records whether the
engine's greedy tokens equal generate's.

    python bench/bench_rollout.py [--out DIR] [--smoke] [--rows 16 64] [--new-tokens 256]
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.common` from any working directory
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.common import Row, arg_parser, copy_bandwidth_gbs, environment, print_table, write_json  # noqa: E402

G = 8
SPEC_FLOOR_16 = 7800.0  # SPEC §4: weight-read floor at batch 16 on an H100


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


def build(smoke: bool, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, prompts(n_prompts) -> PromptBatch): the 3B-sized random model or the tiny one."""
    if smoke:
        from lgrpo.batching import VLBatcher
        from lgrpo.model import load_model
        from lgrpo.synthetic import SyntheticTask

        model = load_model("tiny", seed=0, device=device, dtype=dtype)
        batcher = VLBatcher.from_pretrained("tiny")
        task = SyntheticTask(seed=0)

        def prompts(n: int):
            exs = [task.example("train", i) for i in range(n)]
            return batcher.reasoner_batch([e.prompt for e in exs], [list(e.images) for e in exs]).to(device)

        return model, batcher.tokenizer, prompts
    from bench_train_step import BenchTask, StubTokenizer, build_model, qwen25vl_3b_config

    cfg = qwen25vl_3b_config(False)
    model = build_model(cfg, device, dtype)
    task = BenchTask(cfg, None, n_prompts=64, image_side=448, text_tokens=64)

    def prompts(n: int):
        return task.prompts("train", list(range(n))).to(device, dtype)

    return model, StubTokenizer(), prompts


def vllm_rows(sizes, new, device, rows, info, guarded) -> None:
    """CPU smoke rows of --rollout.engine vllm beside the engine, both on the head_dim-32 tiny variant."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("vllm") is None:
        info["vllm"] = "skipped: vLLM is not installed (tools/vllm_venv.sh makes a venv with it)"
        print(info["vllm"])
        return
    from lgrpo.batching import VLBatcher
    from lgrpo.model import load_model
    from lgrpo.rollout.engine import RolloutEngine
    from lgrpo.rollout.vllm import VLLMRollout, write_tiny_variant
    from lgrpo.synthetic import SyntheticTask

    folder = write_tiny_variant(Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "tiny32")
    model = load_model(str(folder), seed=0, device=device).eval()
    batcher = VLBatcher.from_pretrained(str(folder))
    tok, task = batcher.tokenizer, SyntheticTask(seed=0)
    state = {}

    def start():
        eng, secs = _timed(lambda: VLLMRollout(model, tok, max_new_tokens=new, stop=None, eos_ids=[]))
        state.update(vllm=eng, start_s=secs)

    guarded("vllm start-up", start)
    if "vllm" not in state:
        return
    mine = RolloutEngine(model, tok, max_new_tokens=new, stop=None, eos_ids=[])
    for n_rows in sizes:
        exs = [task.example("train", i) for i in range(max(1, n_rows // G))]
        prompts = batcher.reasoner_batch([e.prompt for e in exs], [list(e.images) for e in exs]).to(device)
        n_rows, tokens = len(prompts) * G, len(prompts) * G * new

        def row(name, eng, key, n_rows=n_rows, prompts=prompts, tokens=tokens):
            _, first_s = _timed(lambda: eng.generate(prompts, G, seed=0, step=0))
            out, secs = _timed(lambda: eng.generate(prompts, G, seed=0, step=1))
            assert int(out.completion_mask.sum()) == tokens, "every completion should run to the budget"
            info[f"{key}_{n_rows}"] = {"tok_s": tokens / secs, "first_call_s": first_s}
            note = f"{tokens / secs:.0f} tok/s; first call {first_s:.2f}s"
            if key == "vllm":
                note += f"; start-up {state['start_s']:.1f}s"
            rows.append(Row(f"{name}, {n_rows} rows x {new}", secs * 1e3, extra={"tok_s": tokens / secs}, note=note))

        guarded(f"vllm, {n_rows} rows", lambda: row("vllm (head_dim 32)", state["vllm"], "vllm"))
        guarded(f"engine (head_dim 32), {n_rows} rows", lambda: row("engine (head_dim 32)", mine, "engine32"))
        v, e = info.get(f"vllm_{n_rows}"), info.get(f"engine32_{n_rows}")
        if v and e:
            print(f"{n_rows} rows: vllm / engine = {v['tok_s'] / e['tok_s']:.2f}x (CPU, tiny head_dim-32 model)")
    info["vllm_start_s"] = state["start_s"]
    state["vllm"].close()


def main(argv=None) -> int:
    p = arg_parser(__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=None, help="rollout rows (multiples of G = 8)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the static-cache + compile rows")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = args.rows or ([8] if smoke else [16, 64])
    new = args.new_tokens or (8 if smoke else 256)
    env = environment()
    rows: list[Row] = []
    info: dict = {"smoke": smoke, "new_tokens": new, "group_size": G}
    title = "Rollouts, Qwen2.5-VL-" + ("tiny [smoke, CPU]" if smoke else "3B-sized (random weights), 2 images/prompt")

    def save():
        write_json(args.out, "bench_rollout", {"title": title, "env": env, "rows": rows, **info})

    from lgrpo.rollout.engine import RolloutEngine  # on CPU it samples with the kernel's PyTorch twin

    model, tok, make_prompts = build(smoke, device, dtype)
    model.eval()
    lm_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "visual" not in n)
    bandwidth = copy_bandwidth_gbs() if cuda else float("nan")
    info.update(lm_bytes=lm_bytes, copy_gbs=bandwidth)
    engine = RolloutEngine(model, tok, max_new_tokens=new, stop=None, eos_ids=[])  # a fixed workload

    def guarded(name, fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a row must report, not end the benchmark
            traceback.print_exc()
            rows.append(Row(name, float("nan"), note=f"failed: {type(exc).__name__}: {str(exc)[:90]}"))
            if cuda:
                torch.cuda.empty_cache()
        finally:
            save()

    for n_rows in sizes:
        prompts = make_prompts(max(1, n_rows // G))
        n_rows = len(prompts) * G
        prompt_len = prompts.length
        info[f"prompt_len_{n_rows}"] = prompt_len
        tokens = n_rows * new
        tok_s = {}

        if cuda:
            k = model.config.get_text_config()
            head_dim = k.hidden_size // k.num_attention_heads
            kv_per_token = 2 * k.num_hidden_layers * k.num_key_value_heads * head_dim * 2  # keys + values, bf16
            step_s = lm_bytes / (bandwidth * 1e9)
            floor = n_rows / step_s
            kv_bytes = n_rows * (prompt_len + new / 2) * kv_per_token  # mean cache length over the steps
            floor_kv = n_rows / ((lm_bytes + kv_bytes) / (bandwidth * 1e9))
            tok_s["floor"] = floor
            rows.append(Row(f"floor, {n_rows} rows: weights / copy bandwidth", step_s * 1e3, ratio=1.0,
                            extra={"tok_s": floor, "tok_s_with_kv": floor_kv},
                            note=f"{floor:.0f} tok/s (+KV: {floor_kv:.0f}); SPEC @16: {SPEC_FLOOR_16:.0f}"))

        def engine_row(n_rows=n_rows, prompts=prompts, tokens=tokens, tok_s=tok_s):
            first, first_s = _timed(lambda: engine.generate(prompts, G, seed=0, step=0))
            capture_s = engine.stats["capture_s"]
            out, secs = _timed(lambda: engine.generate(prompts, G, seed=0, step=1))
            assert int(out.completion_mask.sum()) == tokens, "every completion should run to the budget"
            tok_s["engine"] = tokens / secs
            ratio = tok_s["floor"] / tok_s["engine"] if "floor" in tok_s else None
            info[f"engine_{n_rows}"] = {"tok_s": tok_s["engine"], "first_call_s": first_s, "capture_s": capture_s,
                                        "stats": dict(engine.stats)}
            rows.append(Row(f"engine, {n_rows} rows x {new}", secs * 1e3, ratio=ratio, extra={"tok_s": tok_s["engine"]},
                            note=f"{tok_s['engine']:.0f} tok/s; first call {first_s:.1f}s "
                                 f"(capture {capture_s:.1f}s)"))

        def hf_row(n_rows=n_rows, prompts=prompts, tokens=tokens, tok_s=tok_s, static=False):
            from transformers import GenerationConfig

            # plain transformers: the prompts repeated G times
            batch = prompts.select(torch.arange(len(prompts)).repeat_interleave(G)).model_inputs(model)
            extra = {"cache_implementation": "static"} if static else {}
            cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0,
                                   top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id, eos_token_id=None, **extra)
            # the static cache compiles for its length on the first call: that call runs the full shape;
            # plain sampling only warms up
            warm = cfg if static else GenerationConfig(max_new_tokens=4, do_sample=True, pad_token_id=tok.pad_token_id)
            with torch.no_grad():
                _, first_s = _timed(lambda: model.generate(**batch, generation_config=warm))
                out, secs = _timed(lambda: model.generate(**batch, generation_config=cfg))
            assert out.shape[1] - batch["input_ids"].shape[1] == new
            key = "hf_static" if static else "hf"
            tok_s[key] = tokens / secs
            info[f"{key}_{n_rows}"] = {"tok_s": tok_s[key], "first_call_s": first_s}
            name = f"hf {'static+compile' if static else 'do_sample'}, {n_rows} rows x {new}"
            ratio = tok_s["floor"] / tok_s[key] if "floor" in tok_s else None
            rows.append(Row(name, secs * 1e3, ratio=ratio, extra={"tok_s": tok_s[key]},
                            note=f"{tok_s[key]:.0f} tok/s; first call {first_s:.1f}s; "
                                 f"engine is {tok_s.get('engine', float('nan')) / tok_s[key]:.2f}x"))

        def path_row(n_rows=n_rows, prompts=prompts, tokens=tokens, tok_s=tok_s):
            """What --rollout.engine hf runs: generate + the seeded sampler + the host-side stop check."""
            from lgrpo.rollout.hf import generate

            kw = dict(max_new_tokens=new, stop=None, seed=0)
            _, first_s = _timed(lambda: generate(model, tok, prompts, G, **kw))
            _, secs = _timed(lambda: generate(model, tok, prompts, G, **kw))
            tok_s["path"] = tokens / secs  # (random weights: no EOS, every row runs to the budget)
            info[f"hf_path_{n_rows}"] = {"tok_s": tok_s["path"], "first_call_s": first_s}
            ratio = tok_s["floor"] / tok_s["path"] if "floor" in tok_s else None
            rows.append(Row(f"--rollout.engine hf, {n_rows} rows x {new}", secs * 1e3, ratio=ratio,
                            extra={"tok_s": tok_s["path"]},
                            note=f"{tok_s['path']:.0f} tok/s; engine is "
                                 f"{tok_s.get('engine', float('nan')) / tok_s['path']:.2f}x"))

        guarded(f"engine, {n_rows} rows", engine_row)
        guarded(f"hf generate do_sample, {n_rows} rows", hf_row)
        if smoke:  # on a GPU bench_train_step.py measures this path (169 tok/s on an H100, 16 rows)
            guarded(f"--rollout.engine hf, {n_rows} rows", path_row)
        if cuda and not args.no_compile:
            guarded(f"hf static+compile, {n_rows} rows", lambda: hf_row(static=True))

    def same_greedy():
        """Greedy: the engine's tokens against generate(do_sample=False) on the repeated prompts."""
        from lgrpo.rollout.hf import generate

        prompts = make_prompts(2)
        short = min(new, 16)
        mine = RolloutEngine(model, tok, max_new_tokens=short, stop=None).generate(prompts, 2, greedy=True)
        theirs = generate(model, tok, prompts, 2, max_new_tokens=short, stop=None, greedy=True)
        same = torch.equal(mine.completion_ids.cpu(), theirs.completion_ids.cpu())
        info["same_greedy_tokens"] = same
        if not same:  # bf16 on a GPU: the decode attention kernels differ in the last bits
            agree = (mine.completion_ids.cpu() == theirs.completion_ids.cpu()).float().cumprod(-1).sum(-1)
            info["greedy_tokens_agreeing_before_first_difference"] = agree.tolist()

    guarded("greedy check", same_greedy)
    if smoke:
        vllm_rows(sizes, new, device, rows, info, guarded)
    print_table(title, rows, env)
    for n_rows in sizes:
        e, h = info.get(f"engine_{n_rows}"), info.get(f"hf_{n_rows}")
        if e and h:
            print(f"{n_rows} rows: engine / hf do_sample = {e['tok_s'] / h['tok_s']:.2f}x"
                  + (" (CPU, tiny model)" if smoke else ""))
    save()
    return 0 if all(r.ms == r.ms for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
