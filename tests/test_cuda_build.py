"""The CUDA C++ extension compiles and links here, on a machine without a GPU: every .cu file
in csrc/ for sm_80 and sm_90 with warnings as errors (nvcc's and the host compiler's), the
pybind11 bindings, and the link into one module that imports and exposes its entry points.
Running the kernels is the GPU runbook's part (the "cuda" backend in the op tests)."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastlm import cuda_build
from fastlm.ops import _cuda

ENTRY_POINTS = ["norm_fwd", "norm_bwd", "cross_entropy_fwd", "cross_entropy_bwd", "attention_fwd", "attention_bwd"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_out")
    path = cuda_build.build(out_dir=out, build_dir=tmp_path_factory.mktemp("cuda_build"), archs=("80", "90"))
    return path


def test_every_source_compiles_for_sm80_and_sm90_and_links(built):
    assert built.exists() and built.name == cuda_build.module_name()
    spec = importlib.util.spec_from_file_location("_C", built)  # its init function is PyInit__C
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.ABI == _cuda.ABI
    for name in ENTRY_POINTS:
        assert callable(getattr(module, name)), name


def test_both_targets_are_compiled(tmp_path):
    flags = cuda_build.write_ninja(tmp_path, tmp_path / "x.so", cuda_build.DEFAULT_ARCHS).read_text()
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags


def test_warnings_are_errors(tmp_path):
    flags = cuda_build.write_ninja(tmp_path, tmp_path / "x.so", ("80",)).read_text()
    assert "-Werror all-warnings" in flags and "-Werror" in flags.split("cxx_flags")[1]


def csrc_with(tmp_path, monkeypatch, name: str, source: str) -> None:
    """Point cuda_build at a copy of csrc/'s headers and bindings plus one .cu file ``name``."""
    src = tmp_path / "csrc"
    src.mkdir()
    for f in Path(cuda_build.CSRC).iterdir():
        if f.suffix in (".h", ".cuh", ".cpp"):
            shutil.copy(f, src / f.name)
    (src / name).write_text(source)
    monkeypatch.setattr(cuda_build, "CSRC", src)


def test_a_warning_fails_the_build(tmp_path, monkeypatch):
    """A source with an unused variable must not build (warnings are errors)."""
    csrc_with(tmp_path, monkeypatch, "bad.cu", "__global__ void k(int* p) { int unused = 3; p[0] = 1; }\n")
    with pytest.raises(RuntimeError, match="unused"):
        cuda_build.build(out_dir=tmp_path, build_dir=tmp_path / "b", archs=("80",))


def test_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastlm.cuda_build", "--out", str(tmp_path / "o"),
                           "--build-dir", str(tmp_path / "b"), "--arch", "80"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o" / cuda_build.module_name()).exists()


def test_attention_is_part_of_the_build(tmp_path):
    flags = cuda_build.write_ninja(tmp_path, tmp_path / "x.so", ("80",)).read_text()
    assert "attention.cu" in flags


def test_attention_options_the_cuda_kernels_lack_are_named():
    """What the "cuda" backend of attention refuses, and the reason it gives (checked on CPU
    tensors: the reason depends only on the call; running it is the GPU runbook's part)."""
    import torch

    from fastlm.ops import attention as ops

    def reason(dtype=torch.bfloat16, D=64, Dv=None, mask=None, cu=None, seqused=None, softcap=0.0, dropout_p=0.0):
        q = torch.empty(1, 4, 2, D, dtype=dtype)
        v = torch.empty(1, 4, 2, Dv or D, dtype=dtype)
        return ops._cuda_unsupported(q, q, v, mask, cu, seqused, softcap, dropout_p)

    for dtype in (torch.float16, torch.bfloat16):
        for D in (32, 64, 96, 128):
            assert reason(dtype, D) is None
    assert "float32" in reason(torch.float32)
    assert "head dim 80" in reason(D=80)
    assert "value head dim" in reason(Dv=128)
    assert "mask" in reason(mask=torch.ones(4, 4, dtype=torch.bool))
    assert "variable-length" in reason(cu=torch.tensor([0, 4], dtype=torch.int32))
    assert "KV-cache" in reason(seqused=torch.tensor([4], dtype=torch.int32))
    assert "softcap" in reason(softcap=1.0)
    assert "dropout" in reason(dropout_p=0.1)
    assert "Triton backend" in reason(dropout_p=0.1)
