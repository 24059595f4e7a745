"""nvcc's figures of every csrc/ kernel (fastlm/bench/static_csrc.py, issue 19): each
__global__ instantiation compiled for sm_90 and sm_80 as the build compiles it, with no
stack or spilled registers, shared memory (static plus what the launcher requests) within
the arch's limit, tensor cores in the attention kernels, and the bf16 wmma fragments loaded
through shared-memory addresses. The compiles are cached by source hash (static._cache_dir()),
so a rerun only reads JSON; a cold run takes about a minute on two cores."""

import re
import shutil

import pytest

from fastlm import cuda_build
from fastlm.bench import static, static_csrc

from .test_cuda_build import csrc_with

ARCHS = (90, 80)
HEAD_DIMS = (32, 64, 96, 128)  # csrc/attention.cu's kHeadDims
# (head dim, walked-tile rows) of every attention kernel built: 32-row tiles only where 64
# rows may not fit a 99 KiB device (fastlm.ops.attention.cuda_attention_tile_cols)
VARIANTS = [(d, 64) for d in HEAD_DIMS] + [(96, 32), (128, 32)]


@pytest.fixture(scope="module")
def rows():
    return static_csrc.run_csrc(ARCHS)


def _kernels_in_sources() -> set[str]:
    names = set()
    for src in cuda_build.CSRC.glob("*.cu"):
        names |= set(re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(", src.read_text()))
    return names


def test_every_kernel_has_a_row_for_each_arch(rows):
    assert [r for r in rows if "error" in r] == []
    by_arch = {arch: {r["kernel"] for r in rows if r["arch"] == f"sm_{arch}"} for arch in ARCHS}
    assert by_arch[90] == by_arch[80]
    assert {k.split("<")[0] for k in by_arch[90]} == _kernels_in_sources()
    for kernel in ("attn_fwd_kernel", "attn_bwd_dq_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_delta_kernel"):
        for dtype in ("bf16", "fp16"):
            if kernel == "attn_bwd_delta_kernel":
                assert all(f"{kernel}<{dtype}, d{d}>" in by_arch[90] for d in HEAD_DIMS)
                continue
            for d, nc in VARIANTS:
                assert f"{kernel}<{dtype}, d{d}, nc{nc}>" in by_arch[90]
    for r in rows:
        assert r["impl"] == r["arch"].replace("sm_", "cuda sm_") and r["mode"] in ("fwd", "bwd")


def test_registers_stack_spills_and_shared_memory(rows):
    for r in rows:
        arch = int(r["arch"][3:])
        what = f"{r['kernel']} {r['arch']}"
        assert 0 < r["regs"] <= 255, what
        assert r["stack"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, what
        assert 0 <= r["smem"] <= static.SHARED_LIMIT[arch] and r["smem_ok"], what
        assert r["ctas_per_sm"] == static.ctas_per_sm(arch, r["regs"], r["warps"], r["smem"]) >= 1, what


def test_dynamic_shared_memory_is_the_launchers(rows):
    """The attention kernels' extern __shared__ bytes are Geometry<D, NC>'s, as launched, and
    fastlm.ops.attention's mirror of them; at head dim 128 with 64-row walked tiles: forward
    112 KiB, dQ 113.5 KiB, dK/dV 122.5 KiB (csrc/README.md rounds them)."""
    from fastlm.ops import attention as attn_ops
    smem = {r["kernel"]: r for r in rows if r["arch"] == "sm_90"}
    assert smem["attn_fwd_kernel<bf16, d128, nc64>"]["dynamic_smem"] == 112 * 1024
    assert smem["attn_bwd_dq_kernel<fp16, d128, nc64>"]["dynamic_smem"] == 113.5 * 1024
    assert smem["attn_bwd_dkdv_kernel<bf16, d128, nc64>"]["dynamic_smem"] == 122.5 * 1024
    names = {"attn_fwd_kernel": "forward", "attn_bwd_dq_kernel": "dq", "attn_bwd_dkdv_kernel": "dkdv"}
    for kernel, name in names.items():
        for d, nc in VARIANTS:
            got = smem[f"{kernel}<bf16, d{d}, nc{nc}>"]["dynamic_smem"]
            assert got == attn_ops.cuda_attention_smem_bytes(name, d, nc), (kernel, d, nc)
    assert smem["attn_bwd_delta_kernel<bf16, d128>"]["smem"] == 0
    assert smem["norm_fwd_kernel<bf16>"]["static_smem"] == 32 * 4  # scratch[32] floats
    threads = {r["kernel"].split("<")[0]: r["threads"] for r in rows}
    assert threads["attn_fwd_kernel"] == 128 and threads["norm_fwd_kernel"] == 256 and threads["ce_fwd_kernel"] == 512


def test_attention_products_are_on_tensor_cores(rows):
    for r in rows:
        if r["op"] == "attention" and "delta" not in r["kernel"]:
            assert r["hmma"] > 0, (r["kernel"], r["arch"])


def test_attention_rows_are_stored_16_bytes_at_a_time(rows):
    """The output rows (O, dQ, dK, dV) go out as 16-byte stores (STG.E.128); the only narrow
    global stores left are the forward's float32 lse and the delta pre-pass's float."""
    for r in rows:
        if r["op"] != "attention":
            continue
        what = (r["kernel"], r["arch"])
        if "delta" in r["kernel"]:
            assert r["stg_narrow"] >= 1 and r["stg_128"] == 0, what
        else:
            assert r["stg_128"] > 0, what
            assert r["stg_narrow"] <= (2 if "fwd" in r["kernel"] else 0), what


def test_bf16_fragments_load_from_shared_memory(rows):
    """nvcc turns wmma::load_matrix_sync of bf16 into a generic wmma.load even from shared
    memory (fp16 gets .shared); csrc/attention.cu's load_shared must avoid that."""
    attn = [r for r in rows if r["op"] == "attention" and "delta" not in r["kernel"]]
    assert len(attn) == 2 * 2 * 3 * len(VARIANTS)
    for r in attn:
        assert r["wmma_ld_generic"] == 0 and r["wmma_ld_shared"] > 0, (r["kernel"], r["arch"])
    fp16 = {(r["kernel"].replace("fp16", "bf16"), r["arch"]): r["wmma_ld_shared"] for r in attn if r["dtype"] == "fp16"}
    assert {(r["kernel"], r["arch"]): r["wmma_ld_shared"] for r in attn if r["dtype"] == "bf16"} == fp16


def test_a_rerun_reads_the_cache(rows):
    again = static_csrc.run_csrc(ARCHS)
    assert all(r["cached"] for r in again)
    strip = ("cached",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in again] == \
           [{k: v for k, v in r.items() if k not in strip} for r in rows]


def test_the_cache_key_follows_the_sources(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    shutil.copytree(cuda_build.CSRC, src)
    monkeypatch.setattr(cuda_build, "CSRC", src)
    before = static_csrc._cache_key(src / "norm.cu", 90)
    assert static_csrc._cache_key(src / "norm.cu", 80) != before
    (src / "common.cuh").write_text((src / "common.cuh").read_text() + "\n// changed\n")
    assert static_csrc._cache_key(src / "norm.cu", 90) != before


def test_ptxas_log_parsing():
    log = ("ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z1kPf\n"
           "    24 bytes stack frame, 40 bytes spill stores, 52 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 128 bytes smem, 24 bytes cumulative stack size\n")
    assert static_csrc._ptxas_figures(log) == {"_Z1kPf": {"regs": 255, "stack": 24, "spill_stores": 40,
                                                          "spill_loads": 52, "static_smem": 128}}


def test_launch_config_reads_the_launcher():
    text = ("constexpr int kWarps = 4;\nconstexpr int kThreads = 32 * kWarps;\n"
            "template <int D>\nstruct Geometry {\n  static constexpr int LDT = D + 8;\n"
            "  static constexpr int kFwd = 3 * 64 * LDT * 2;\n};\n"
            "template <typename T, int D>\n__global__ void __launch_bounds__(kThreads) f_kernel(int a) {\n"
            "  extern __shared__ __align__(128) unsigned char smem[];\n}\n"
            "template <typename Kernel> void launch(Kernel kernel, long blocks, int smem_bytes) {\n"
            "  kernel<<<static_cast<unsigned>(blocks), kThreads, smem_bytes, 0>>>(1);\n}\n"
            "void run() { launch(f_kernel<T, D>, cdiv(n, 64), Geometry<D>::kFwd); g_kernel<T><<<n, kThreads>>>(2); }\n")
    assert static_csrc._launch_config(text, "f_kernel", ["__half", "64"]) == (128, 3 * 64 * 72 * 2)
    assert static_csrc._launch_config(text, "g_kernel", ["float"]) == (128, 0)
    with pytest.raises(RuntimeError, match="no launch of h_kernel"):
        static_csrc._launch_config(text.replace("f_kernel(int a)", "h_kernel(int a)"), "h_kernel", ["float"])


def test_the_build_warns_on_spills_as_errors(tmp_path):
    flags = cuda_build.nvcc_flags(("80",))
    i = flags.index("-warn-spills")
    assert flags[i - 1] == "-Xptxas" and "all-warnings" in flags and flags[flags.index("all-warnings") - 1] == "-Werror"
    ninja = cuda_build.write_ninja(tmp_path, tmp_path / "x.so", ("80",)).read_text()
    assert "-Xptxas -warn-spills" in ninja.split("cxx_flags")[0]
    assert "-warn-spills" not in static_csrc._flags(90)  # the report measures spills instead


def test_a_spill_fails_the_build(tmp_path, monkeypatch):
    """-Werror all-warnings makes ptxas's spill warning an error."""
    csrc_with(tmp_path, monkeypatch, "spills.cu",
        "// At most 32 registers (1024 threads, 2 blocks per SM) for 64 live values: ptxas spills.\n"
        "__global__ void __launch_bounds__(1024, 2) spills(float* p) {\n  float v[64];\n#pragma unroll\n"
        "  for (int i = 0; i < 64; ++i) v[i] = p[i * 1024 + threadIdx.x];\n  float s = 0.0f;\n#pragma unroll\n"
        "  for (int i = 0; i < 64; ++i)\n#pragma unroll\n    for (int j = 0; j < 64; ++j) s += v[i] * v[j] * p[j];\n"
        "  p[threadIdx.x] = s;\n}\n")
    with pytest.raises(RuntimeError, match="spilled"):
        cuda_build.build(out_dir=tmp_path, build_dir=tmp_path / "b", archs=("80",))
