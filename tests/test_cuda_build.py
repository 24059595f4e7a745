"""The CUDA C++ extension compiles and links here, on a machine without a GPU: every .cu file
in csrc/ for sm_80 and sm_90 (plus sm_90's PTX) with warnings as errors (nvcc's and the host
compiler's), the pybind11 bindings, and the link into one module that imports and exposes its
entry points. Also which nvcc the build picks (fake toolkits), and where an installed copy
finds its sources (tests/test_cuda_install.py installs it for real).
Running the kernels is the GPU runbook's part (the "cuda" backend in the op tests)."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastlm import cuda_build
from fastlm.ops import _cuda

ENTRY_POINTS = ["norm_fwd", "norm_bwd", "cross_entropy_fwd", "cross_entropy_bwd", "attention_fwd", "attention_bwd",
                "attention_smem_bytes", "attention_tile_cols", "cuda_runtime_version", "cuda_driver_version"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_out")
    path = cuda_build.build(out_dir=out, build_dir=tmp_path_factory.mktemp("cuda_build"), archs=("80", "90"))
    return path


def _load(path):
    spec = importlib.util.spec_from_file_location("_C", path)  # its init function is PyInit__C
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_source_compiles_for_sm80_and_sm90_and_links(built):
    assert built.exists() and built.name == cuda_build.module_name()
    module = _load(built)
    assert module.ABI == _cuda.ABI
    for name in ENTRY_POINTS:
        assert callable(getattr(module, name)), name


def test_the_tile_plan_of_the_module_is_fastlms_mirror(built):
    """csrc/attention.cu's own plan (its host functions run without a GPU) and
    fastlm.ops.attention's mirror agree for every kernel, head dim and tile size, and under the
    opt-in limits of sm_80, sm_86/89, sm_90/100 and at the edges of every variant's need."""
    from fastlm.ops import attention as attn_ops
    module = _load(built)
    limits = {40000, 101376, 166912, 232448}
    for number, kernel in enumerate(attn_ops.CUDA_ATTENTION_KERNELS):
        for d in (16, 32, 64, 80, 96, 128, 256):
            for nc in (16, 32, 64, 128):
                want = attn_ops.cuda_attention_smem_bytes(kernel, d, nc)
                assert module.attention_smem_bytes(number, d, nc) == (-1 if want is None else want), (kernel, d, nc)
                if want is not None:
                    limits |= {want - 1, want, want + 1}
        for d in (32, 64, 96, 128, 80):
            for limit in sorted(limits):
                assert module.attention_tile_cols(number, d, limit) == \
                    attn_ops.cuda_attention_tile_cols(kernel, d, limit), (kernel, d, limit)


def test_the_module_reports_its_runtime_and_the_driver(built):
    """The runtime linked in is the nvcc's (13.x here); this machine has no driver: 0, which
    fastlm/ops/_cuda.py turns into the reason the backend is unavailable."""
    module = _load(built)
    nvcc_major = cuda_build.find_nvcc().version[0]
    assert module.cuda_runtime_version() // 1000 == nvcc_major
    driver = module.cuda_driver_version()
    assert driver >= 0
    if driver == 0:
        assert "no CUDA driver" in _cuda.runtime_mismatch(module.cuda_runtime_version(), driver)
    # the targets it was built for, which _cuda.jit_mismatch reads (the fixture builds 80 and 90)
    assert list(module.SASS_ARCHS) == [80, 90] and module.PTX_ARCH == 90


def cuobjdump(*args) -> str:
    from fastlm.bench.static_csrc import _tool  # CUDA's bin/ or the copy Triton ships

    tool = _tool("cuobjdump")
    assert tool is not None, "cuobjdump not found (CUDA's bin/ or Triton's copy)"
    done = subprocess.run([tool, *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_module_has_sass_for_each_target_and_ptx_for_the_highest(built):
    """Machine code for sm_80 and sm_90, and sm_90's PTX, which the driver compiles for a
    newer GPU (Blackwell) that would otherwise find no kernel image."""
    elf = cuobjdump("--list-elf", built)
    assert ".sm_80.cubin" in elf and ".sm_90.cubin" in elf, elf
    ptx = cuobjdump("--list-ptx", built)
    assert ptx.count(".sm_90.ptx") == len(list(cuda_build.CSRC.glob("*.cu"))), ptx  # one per .cu file
    assert ".sm_80.ptx" not in ptx, ptx  # sm_90's PTX serves every newer GPU; sm_80's would add nothing


def test_both_targets_are_compiled(tmp_path):
    flags = cuda_build.write_ninja(tmp_path, tmp_path / "x.so", cuda_build.DEFAULT_ARCHS).read_text()
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags


def test_ptx_of_the_highest_target_is_embedded_at_compile_and_link(tmp_path):
    assert cuda_build.gencode(("90", "80")) == ["-gencode=arch=compute_90,code=sm_90",
                                                "-gencode=arch=compute_80,code=sm_80",
                                                "-gencode=arch=compute_90,code=compute_90"]
    assert cuda_build.gencode(("80", "90a"))[-1] == "-gencode=arch=compute_90,code=compute_90"
    ninja = cuda_build.write_ninja(tmp_path, tmp_path / "x.so", ("80", "90")).read_text()
    compile_flags = ninja.split("nvcc_flags = ")[1].splitlines()[0]
    link = ninja.split("rule link")[1].splitlines()[1]
    for line in (compile_flags, link):
        assert "-gencode=arch=compute_90,code=compute_90" in line and "code=compute_80" not in line, line
    with pytest.raises(ValueError, match="SM numbers"):
        cuda_build.gencode(("sm_80",))


def test_targets_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTLM_CUDA_ARCHS", raising=False)
    assert cuda_build.default_archs() == cuda_build.DEFAULT_ARCHS == ("80", "90")
    monkeypatch.setenv("FASTLM_CUDA_ARCHS", "80")
    assert cuda_build.default_archs() == ("80",)
    monkeypatch.setenv("FASTLM_CUDA_ARCHS", " 80, 90a ")
    assert cuda_build.default_archs() == ("80", "90a")
    monkeypatch.setenv("FASTLM_CUDA_ARCHS", "ampere")
    with pytest.raises(ValueError, match="FASTLM_CUDA_ARCHS"):
        cuda_build.default_archs()
    # build() without archs takes the variable's
    monkeypatch.setenv("FASTLM_CUDA_ARCHS", "86")
    seen = []

    def stop(build_dir, out, archs):
        seen.append(archs)
        raise RuntimeError("stop")

    monkeypatch.setattr(cuda_build, "write_ninja", stop)
    with pytest.raises(RuntimeError, match="stop"):
        cuda_build.build(out_dir=tmp_path, build_dir=tmp_path / "b")
    assert seen == [("86",)]


def fake_nvcc(folder: Path, version: str) -> str:
    """A shell script in folder/bin that answers --version like nvcc {version}."""
    (folder / "bin").mkdir(parents=True)
    path = folder / "bin" / "nvcc"
    path.write_text(f"#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    f"echo 'Cuda compilation tools, release {version}, V{version}.77'\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def toolkits(tmp_path, monkeypatch):
    """Fake toolkits: $CUDA_HOME 12.4, $CUDA_PATH 13.0, PATH's 12.8, and a system root (in place
    of /usr/local) with cuda-12.6/ and cuda/ (11.8); no FASTLM_NVCC."""
    import torch

    home, cpath, on_path = (fake_nvcc(tmp_path / n, v) for n, v in (("home", "12.4"), ("cpath", "13.0"),
                                                                     ("onpath", "12.8")))
    system = tmp_path / "usr_local"
    versioned = fake_nvcc(system / "cuda-12.6", "12.6")
    default = fake_nvcc(system / "cuda", "11.8")
    monkeypatch.setattr(cuda_build, "SYSTEM_CUDA", str(system))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "cpath"))
    monkeypatch.setenv("PATH", str(tmp_path / "onpath" / "bin") + ":/usr/bin:/bin")
    monkeypatch.delenv("FASTLM_NVCC", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    return dict(home=home, cpath=cpath, on_path=on_path, versioned=versioned, default=default,
                torch=torch, system=system)


def test_nvcc_matching_torchs_cuda_version_is_preferred(toolkits, monkeypatch):
    torch = toolkits["torch"]
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    chosen = cuda_build.find_nvcc()
    assert (chosen.path, chosen.version) == (toolkits["on_path"], (12, 8)) and "12.8" in chosen.reason
    assert cuda_build._nvcc() == toolkits["on_path"]
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert cuda_build.find_nvcc().path == toolkits["cpath"]
    # /usr/local/cuda-<torch's version> is a candidate too
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    assert cuda_build.find_nvcc().path == toolkits["versioned"]
    # no 12.2 anywhere: the first of the same major version ($CUDA_HOME's 12.4)
    monkeypatch.setattr(torch.version, "cuda", "12.2")
    chosen = cuda_build.find_nvcc()
    assert chosen.path == toolkits["home"] and "major version" in chosen.reason
    # none of its major version: the first found
    monkeypatch.setattr(torch.version, "cuda", "11.8")
    assert cuda_build.find_nvcc().path == toolkits["default"]
    monkeypatch.setattr(torch.version, "cuda", "10.2")
    assert cuda_build.find_nvcc().path == toolkits["home"]


def test_nvcc_without_torchs_cuda_is_the_first_found(toolkits, monkeypatch):
    chosen = cuda_build.find_nvcc()  # torch.version.cuda is None: a CPU build
    assert chosen.path == toolkits["home"] and "CPU build" in chosen.reason and "$CUDA_HOME" in chosen.reason
    monkeypatch.setitem(sys.modules, "torch", None)  # not importable (pip's isolated build environment)
    chosen = cuda_build.find_nvcc()
    assert chosen.path == toolkits["home"] and "not importable" in chosen.reason
    # the order of the rest: $CUDA_PATH, PATH, the system's cuda/
    monkeypatch.delenv("CUDA_HOME")
    assert cuda_build.find_nvcc().path == toolkits["cpath"]
    monkeypatch.delenv("CUDA_PATH")
    assert cuda_build.find_nvcc().path == toolkits["on_path"]
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert cuda_build.find_nvcc().path == toolkits["default"]
    (toolkits["system"] / "cuda" / "bin" / "nvcc").unlink()
    with pytest.raises(RuntimeError, match="nvcc not found"):
        cuda_build.find_nvcc()


def test_fastlm_nvcc_wins(toolkits, monkeypatch, tmp_path):
    monkeypatch.setattr(toolkits["torch"].version, "cuda", "12.8")
    explicit = fake_nvcc(tmp_path / "mine", "12.1")
    monkeypatch.setenv("FASTLM_NVCC", explicit)
    chosen = cuda_build.find_nvcc()
    assert (chosen.path, chosen.version) == (explicit, (12, 1)) and "FASTLM_NVCC" in chosen.reason
    monkeypatch.setenv("FASTLM_NVCC", str(tmp_path / "missing" / "nvcc"))
    with pytest.raises(RuntimeError, match="FASTLM_NVCC"):
        cuda_build.find_nvcc()


def test_an_installed_copy_builds_from_its_shipped_sources_outside_site_packages(tmp_path, monkeypatch):
    """cuda_build.py installed (no checkout around it) finds the sources shipped in
    fastlm/csrc/ and puts its objects in a cache folder, not in site-packages."""
    import importlib.util

    site = tmp_path / "site-packages"
    shutil.copytree(cuda_build.CSRC, site / "fastlm" / "csrc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(cuda_build.__file__, site / "fastlm" / "cuda_build.py")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("_installed_cuda_build", site / "fastlm" / "cuda_build.py")
    installed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installed)
    assert not installed.IN_CHECKOUT and installed.CSRC == site / "fastlm" / "csrc"
    assert installed.default_build_dir().is_relative_to(tmp_path / "cache")
    assert cuda_build.IN_CHECKOUT and cuda_build.CSRC == Path(cuda_build.__file__).parent.parent / "csrc"
    ninja = installed.write_ninja(tmp_path / "b", tmp_path / "x.so", ("80",)).read_text()
    assert f"nvcc {site / 'fastlm' / 'csrc' / 'norm.cu'}" in ninja


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
    assert f"nvcc {cuda_build.find_nvcc().path}" in done.stdout and "PTX compute_80" in done.stdout  # says which


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
