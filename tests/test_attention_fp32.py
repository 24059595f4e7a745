"""float32 attention: IEEE or TF32 dots as torch's float32 matmul setting says, and IEEE tiles
that do not spill.

Under the interpreter a tl.dot is exact float32 either way, so IEEE vs TF32 is only the
constexpr IEEE the launchers pass: these tests record it at every launch. Whether a tile
configuration spills is a compiler fact, checked by compiling for sm_90 with Triton's ptxas
(kernels/compile_check.py, without the interpreter, in a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

import fastlm
from fastlm.kernels import attention as kern
from fastlm.kernels import launch

from .conftest import DEVICE
from .test_attention import check, naive, qkv

KERNELS = ["_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]
LAUNCH_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "IEEE", "num_warps", "num_stages")


class _Recorder:
    """Stands in for a kernel: records the keyword arguments of each launch, then launches."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        launch_ = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append((self.name, kwargs))
            return launch_(*args, **kwargs)

        return run


@pytest.fixture
def launches(monkeypatch):
    log = []
    for name in KERNELS:
        monkeypatch.setattr(kern, name, _Recorder(getattr(kern, name), name, log))
    return log


@pytest.fixture
def restore_precision():
    """Whatever a test sets, torch's float32 matmul setting comes back (in a form that keeps
    both torch's legacy and new getters readable)."""
    before = torch.get_float32_matmul_precision()
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision(before)


def _set(setting):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch >= 2.9 warns about the legacy setters
        kind, value = setting
        if kind == "allow_tf32":
            torch.backends.cuda.matmul.allow_tf32 = value
        elif kind == "precision":
            torch.set_float32_matmul_precision(value)
        else:
            if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
                pytest.skip("this torch has no torch.backends.cuda.matmul.fp32_precision")
            torch.backends.cuda.matmul.fp32_precision = value


def _run(dtype, D=16, L=17):
    q, k, v = (t.requires_grad_(True) for t in qkv(1, L, L, 2, 2, D, dtype=dtype))
    with fastlm.use_backend("triton"):
        out = fastlm.flash_attn_func(q, k, v, causal=True)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))


SETTINGS = [
    (("precision", "highest"), True),
    (("allow_tf32", True), False),
    (("allow_tf32", False), True),
    (("precision", "high"), False),
    (("precision", "medium"), False),
    (("fp32_precision", "tf32"), False),
    (("fp32_precision", "ieee"), True),
]


@pytest.mark.parametrize("setting,ieee", SETTINGS, ids=lambda x: "-".join(map(str, x)) if isinstance(x, tuple) else
                         str(x))
def test_ieee_flag_follows_torch_float32_matmul_setting(launches, restore_precision, setting, ieee):
    """Every float32 launch (forward, dK/dV, dQ) takes IEEE dots exactly when torch keeps float32
    matmuls at "highest" precision, as SDPA and cuBLAS do; float16 never passes IEEE."""
    _set(setting)
    _run(torch.float32)
    assert {name for name, _ in launches} == set(KERNELS)
    assert all(kwargs["IEEE"] is ieee for _, kwargs in launches), [(n, kw["IEEE"]) for n, kw in launches]
    launches.clear()
    _run(torch.float16)
    assert launches and all(kwargs["IEEE"] is False for _, kwargs in launches)



@pytest.mark.parametrize("setting,ieee", SETTINGS, ids=lambda x: "-".join(map(str, x)) if isinstance(x, tuple) else
                         str(x))
def test_matmul_kernels_follow_the_same_setting(restore_precision, setting, ieee):
    """The feed-forward matmuls read the same switch (kernels.launch.tf32_allowed): reading
    torch's legacy allow_tf32 raises once fp32_precision has been set."""
    from fastlm.kernels import matmul
    _set(setting)
    assert matmul._ieee(torch.float32) is ieee
    assert matmul._ieee(torch.float16) is False
    x, w = torch.randn(17, 16, device=DEVICE), torch.randn(16, 16, device=DEVICE)
    with fastlm.use_backend("triton"):
        torch.testing.assert_close(fastlm.linear(x, w), x @ w.t(), rtol=1e-4, atol=1e-4)

def _compiled_variants():
    """gpu_compile_variants() as compile_check sees it (without the interpreter): the launch
    keys of every float32 variant of the three kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from fastlm.kernels import attention as A\n"
            "print(json.dumps([[k.__name__, s['Q'], c['BLOCK_M'], c['BLOCK_N'], c['BLOCK_D'], c['IEEE'],"
            " o['num_warps'], o['num_stages']] for k, s, c, o in A.gpu_compile_variants() if 'IEEE' in c]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return {(row[0],) + tuple(row[2:]) for row in json.loads(out.stdout.splitlines()[-1]) if row[1] == "*fp32"}


def test_gpu_tiles_follow_the_setting_and_are_the_compiled_variants(launches, restore_precision):
    """With the GPU's own launch settings (FASTLM_GPU_TILES), float32 takes the spill-free IEEE
    tiles under "highest" precision and the TF32 tiles once TF32 is allowed; each launch is a
    variant kernels/compile_check.py compiles (and checks for spills, below)."""
    got = {}
    with launch.use_gpu_tiles():
        for setting, d in ((("precision", "highest"), 64), (("precision", "high"), 128)):
            _set(setting)
            launches.clear()
            _run(torch.float32, D=d, L=40)
            got[setting[1]] = {(name,) + tuple(kw[key] for key in LAUNCH_KEYS) for name, kw in launches}
    assert all(row[4] for row in got["highest"]) and not any(row[4] for row in got["high"])
    assert {row[0] for row in got["highest"]} == set(KERNELS)
    ieee_tiles = {row[1:3] + row[5:] for row in got["highest"] if row[0] == "_attn_fwd_kernel"}
    tf32_tiles = {row[1:3] + row[5:] for row in got["high"] if row[0] == "_attn_fwd_kernel"}
    assert ieee_tiles != tf32_tiles, (ieee_tiles, tf32_tiles)
    compiled = _compiled_variants()
    missing = (got["highest"] | got["high"]) - compiled
    assert not missing, f"launched but never compiled by compile_check: {missing}; compiled: {compiled}"


@pytest.mark.parametrize("D", [128, 256])
def test_ieee_gpu_tiles_give_right_answers(restore_precision, D):
    """The IEEE tiles (32 x 16, dK/dV 16 x 16) run under the interpreter with the GPU's launch
    settings: lengths 33 and 17 cross their edges, forward and backward, causal with GQA."""
    _set(("precision", "highest"))
    with launch.use_gpu_tiles():
        assert kern._blocks(SimpleNamespace(D=D, DV=D), DEVICE, torch.float32)[:2] == (32, 16)
        check("triton", lambda q, k, v: fastlm.flash_attn_func(q, k, v, causal=True),
              lambda q, k, v: naive(q, k, v, causal=True), qkv(1, 33, 17, 2, 1, D))


def test_ieee_float32_variants_do_not_spill_on_sm90():
    """Every IEEE float32 attention variant compile_check knows (head dims 64, 128, 256; forward,
    dK/dV, dQ and the mask gradient) compiles for sm_90 with no stack frame: no spilled
    register. The tensor-core tiles they used before spilled 8-13 KB per thread there (128, 256)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fastlm.kernels.compile_check", "--arch", "90",
                          "--only", r"^attention\..*'IEEE': True", "--no-spills", "."],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    checked = [line for line in out.stdout.splitlines() if line.startswith("stack 0 bytes: attention.")]
    kernels = {line.split()[3].split(".")[1] for line in checked}
    assert kernels == set(KERNELS) and len(checked) >= 9, out.stdout[-4000:]
    assert " 0 failed" in out.stdout
