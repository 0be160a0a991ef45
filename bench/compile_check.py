"""Compile every Triton kernel variant the GPU paths launch for sm_90, without a GPU.

The Triton interpreter (what the CPU tests run) accepts code the compiler rejects: non-constexpr
globals, methods on integer arguments that Triton specialises to constants (value 1), type clashes
in loops. This script runs the real compiler down to a cubin with the ptxas bundled in the triton
wheel, and reads each kernel's registers and local memory (spills) with the bundled cuobjdump.

The streaming ("hot") variants are compiled the way the launcher specialises them for the
benchmark shapes (V = 152064 and the row strides divisible by 16, 16-byte aligned pointers), and
must then read the logits with 16-byte vector loads (``ld.global.v4``): without them the kernels
issue 2-byte loads and fall far short of the copy bandwidth.

    python bench/compile_check.py          # table; exit status 1 if a kernel fails or spills

Must run without TRITON_INTERPRET (the kernels must be real @triton.jit functions).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, without the warning
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from lgrpo.kernels import advantages, grpo, logprobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)

ROW = dict(rows_per_batch="i32", stride_b="i64", stride_t="i64", row_idx_ptr="*i64", tgt_ptr="*i64",
           mask_ptr="*u8", logp_ptr="*fp32", ent_ptr="*fp32", lse_ptr="*fp32", n_rows="i32", V="i32",
           scale="fp32", x_sb="i64", x_st="i64", d_sb="i64", d_st="i64", coef_ptr="*fp32", scale_ptr="*fp32",
           inv_temp="fp32")
LOSS = dict(seg_ptr="*i64", seg_seq_ptr="*i64", seg_len="i32", row_idx_ptr="*i64", mask_ptr="*u8",
            logp_ptr="*fp32", old_ptr="*fp32", ref_ptr="*fp32", adv_ptr="*fp32", counts_ptr="*fp32",
            wloss_ptr="*fp32", dlogp_ptr="*fp32", kl_ptr="*fp32", clip_ptr="*u8", lo="fp32", hi="fp32",
            delta="fp32", beta="fp32", wloss_ptr_="*fp32", num_items_ptr="*fp32", loss_ptr="*fp32",
            inv_ptr="*fp32", n_rows="i32", n_seqs="i32", host_inv="fp32")
ADV = dict(r_ptr="*fp32", out_ptr="*fp32", n_groups="i32", G="i32", inv_n="fp32", inv_g1="fp32",
           inv_n1="fp32")


def variants():
    """(label, kernel, argument types, constexprs, num_warps, hot) for every launch the code makes."""
    big_fwd = dict(BLOCK_R=1, BLOCK_V=2048)
    big_bwd = dict(BLOCK_R=1, BLOCK_V=4096)
    small = dict(BLOCK_R=32, BLOCK_V=64)
    for dtype in ("bf16", "fp16", "fp32"):
        yield (f"row_stats {dtype} grpo", logprobs._row_stats_kernel, dict(ROW, x_ptr=f"*{dtype}"),
               dict(ROW_MAP=False, HAS_MASK=True, ENTROPY=True, **big_fwd), 1, True)
        yield (f"row_grad {dtype}", logprobs._row_grad_kernel,
               dict(ROW, x_ptr=f"*{dtype}", d_ptr=f"*{dtype}"),
               dict(ROW_MAP=False, HAS_SCALE=True, **big_bwd), 16, True)
    yield ("row_stats bf16 token_logprobs", logprobs._row_stats_kernel, dict(ROW, x_ptr="*bf16"),
           dict(ROW_MAP=False, HAS_MASK=False, ENTROPY=False, **big_fwd), 1, True)
    yield ("row_stats bf16 linear (row map)", logprobs._row_stats_kernel, dict(ROW, x_ptr="*bf16"),
           dict(ROW_MAP=True, HAS_MASK=False, ENTROPY=True, **big_fwd), 1, True)
    yield ("row_grad bf16 linear (row map)", logprobs._row_grad_kernel,
           dict(ROW, x_ptr="*bf16", d_ptr="*bf16"),
           dict(ROW_MAP=True, HAS_SCALE=True, **big_bwd), 16, True)
    yield ("row_stats short rows, T=1", logprobs._row_stats_kernel, dict(ROW, x_ptr="*bf16"),
           dict(ROW_MAP=False, HAS_MASK=True, ENTROPY=True, rows_per_batch=1, **small), 8, True)
    yield ("row_grad short rows, no scale", logprobs._row_grad_kernel,
           dict(ROW, x_ptr="*fp32", d_ptr="*fp32"),
           dict(ROW_MAP=False, HAS_SCALE=False, rows_per_batch=1, **small), 8, True)
    flags = ("SEG_TABLE", "SEG_SEQ", "ROW_MAP", "HAS_MASK", "HAS_OLD", "HAS_REF", "USE_KL", "KL_IS", "HAS_DELTA",
             "SEQ_LEVEL", "SEQ_MEAN", "COUNT")
    loss_cases = {
        "token padded, all options": dict(HAS_MASK=1, HAS_OLD=1, HAS_REF=1, USE_KL=1, HAS_DELTA=1,
                                          SEQ_MEAN=1, COUNT=1),
        "token padded, on-policy, T=1": dict(HAS_MASK=1, COUNT=1, seg_len=1),
        "sequence packed, all options": dict(SEG_TABLE=1, HAS_MASK=1, HAS_OLD=1, HAS_REF=1, USE_KL=1,
                                             HAS_DELTA=1, SEQ_LEVEL=1, COUNT=1),
        "sequence packed, no old, kl only": dict(SEG_TABLE=1, HAS_MASK=1, HAS_REF=1, SEQ_LEVEL=1, COUNT=1),
        "token linear segments": dict(SEG_TABLE=1, SEG_SEQ=1, ROW_MAP=1, HAS_OLD=1, HAS_REF=1, USE_KL=1,
                                      SEQ_MEAN=1),
        "sequence linear segments": dict(SEG_TABLE=1, SEG_SEQ=1, ROW_MAP=1, HAS_OLD=1, HAS_REF=1, USE_KL=1,
                                         HAS_DELTA=1, SEQ_LEVEL=1),
        "token padded, bias-corrected kl": dict(HAS_MASK=1, HAS_OLD=1, HAS_REF=1, USE_KL=1, KL_IS=1, SEQ_MEAN=1,
                                                COUNT=1),
        "sequence linear, bias-corrected kl": dict(SEG_TABLE=1, SEG_SEQ=1, ROW_MAP=1, HAS_REF=1, USE_KL=1, KL_IS=1,
                                                   HAS_DELTA=1, SEQ_LEVEL=1),
    }
    for label, on in loss_cases.items():
        consts = {f: bool(on.get(f, 0)) for f in flags}
        consts["BLOCK"] = 512
        if "seg_len" in on:
            consts["seg_len"] = on["seg_len"]
        yield f"token_loss {label}", grpo._token_loss_kernel, LOSS, consts, 4, False
    for code in range(4):
        types = dict(LOSS, wloss_ptr="*fp32")
        yield (f"loss_reduce type {code}, B=1", grpo._loss_reduce_kernel, types,
               dict(LOSS_TYPE=code, HAS_LOSS=True, BLOCK=1024, n_seqs=1), 4, False)
    for scale in range(3):
        yield (f"group_advantages scale {scale}, G=1", advantages._group_advantages_kernel, ADV,
               dict(SCALE=scale, BLOCK_G=1024, BLOCK_M=1, G=1), 4, False)
        yield (f"group_advantages scale {scale}", advantages._group_advantages_kernel, ADV,
               dict(SCALE=scale, BLOCK_G=128, BLOCK_M=8), 4, False)


def resource_usage(cubin: bytes) -> dict:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", fh.name], capture_output=True,
                              text=True, check=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return usage


# Arguments Triton's launcher marks divisible by 16 in the benchmark runs (pointers from the
# caching allocator are 512-byte aligned; V = 152064 and the row strides are multiples of 16).
ALIGNED = {"x_ptr", "d_ptr", "row_idx_ptr", "tgt_ptr", "mask_ptr", "logp_ptr", "ent_ptr", "lse_ptr",
           "coef_ptr", "scale_ptr", "stride_b", "stride_t", "V", "x_sb", "x_st", "d_sb", "d_st"}


def compile_one(fn, types, consts, num_warps, hot=False):
    sig = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if hot and name in ALIGNED and name not in consts}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=TARGET,
                            options=dict(num_warps=num_warps))
    usage = resource_usage(kernel.asm["cubin"])
    usage["vector_loads"] = len(re.findall(r"ld\.global(?:\.nc)?\.v[24]\.", kernel.asm["ptx"]))
    return usage


def main() -> int:
    failures = 0
    print(f"{'kernel variant':<46} {'warps':>5} {'regs':>5} {'stack':>6} {'local':>6} {'v-lds':>5}  status")
    for label, fn, types, consts, warps, hot in variants():
        try:
            use = compile_one(fn, types, consts, warps, hot=hot and consts.get("BLOCK_R") == 1)
            spills = use.get("local", 0) + use.get("stack", 0)
            status = "ok"
            if hot and spills:
                status = "SPILLS in a streaming kernel"
            elif hot and consts.get("BLOCK_R") == 1 and not use["vector_loads"]:
                status = "NO 16-byte vector loads in a streaming kernel"
            failures += status != "ok"
            print(f"{label:<46} {warps:>5} {use.get('reg', 0):>5} {use.get('stack', 0):>6} "
                  f"{use.get('local', 0):>6} {use['vector_loads']:>5}  {status}")
        except Exception as exc:  # noqa: BLE001 - report every failing variant, then fail
            failures += 1
            first = str(exc).strip().splitlines()
            print(f"{label:<46} {warps:>5}  FAILED: {type(exc).__name__}: {' | '.join(first[-3:])[:300]}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
