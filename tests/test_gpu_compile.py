"""Every Triton kernel variant compiles for sm_80 and sm_90, here, without a GPU.

The interpreter that runs the kernel tests on CPU never compiles; this does, with the
ptxas that triton ships (kernels/compile_check.py)."""

import os
import subprocess
import sys


def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fastlm.kernels.compile_check", "--arch", "80", "90"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert " 0 failed" in out.stdout
