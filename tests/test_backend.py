"""Backend selection: names, scoping, the environment variable, fallback and errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import fastlm
from fastlm import backend as B

from .conftest import DEVICE, ON_GPU


@pytest.fixture(autouse=True)
def _restore_default():
    saved = B._process_default
    yield
    B._process_default = saved


def test_available_backends_reports_every_backend_with_a_reason():
    info = fastlm.available_backends()
    assert list(info) == ["torch", "triton", "cuda"]
    assert info["torch"].available
    assert info["triton"].available  # the interpreter here, a GPU in the runbook
    for name, (available, reason) in info.items():
        assert isinstance(available, bool) and reason, name
    if not ON_GPU:
        assert not info["cuda"].available and "cuda" in info["cuda"].reason.lower()


def test_default_is_auto():
    assert fastlm.get_backend() in ("auto", os.environ.get("FASTLM_BACKEND", "auto"))


def test_use_backend_is_scoped_and_nests():
    fastlm.set_backend("auto")
    with fastlm.use_backend("triton"):
        assert fastlm.get_backend() == "triton"
        with fastlm.use_backend("torch"):
            assert fastlm.get_backend() == "torch"
        assert fastlm.get_backend() == "triton"
    assert fastlm.get_backend() == "auto"


def test_use_backend_restores_after_an_exception():
    fastlm.set_backend("auto")
    with pytest.raises(RuntimeError):
        with fastlm.use_backend("torch"):
            raise RuntimeError("boom")
    assert fastlm.get_backend() == "auto"


def test_use_backend_does_not_leak_into_other_threads():
    fastlm.set_backend("torch")
    seen = {}
    with fastlm.use_backend("triton"):
        t = threading.Thread(target=lambda: seen.setdefault("other", fastlm.get_backend()))
        t.start()
        t.join()
        seen["here"] = fastlm.get_backend()
    assert seen == {"other": "torch", "here": "triton"}


def test_set_backend_is_process_wide_and_use_backend_overrides_it():
    fastlm.set_backend("torch")
    assert fastlm.get_backend() == "torch"
    with fastlm.use_backend("triton"):
        assert fastlm.get_backend() == "triton"
    fastlm.set_backend("AUTO")
    assert fastlm.get_backend() == "auto"


@pytest.mark.parametrize("bad", ["tritn", "", None, 3])
def test_unknown_backend_names_raise(bad):
    with pytest.raises(ValueError, match="backend"):
        fastlm.set_backend(bad)
    with pytest.raises(ValueError, match="backend"):
        with fastlm.use_backend(bad):
            pass


def _in_subprocess(code: str, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_environment_variable_sets_the_default():
    out = _in_subprocess("import fastlm; print(fastlm.get_backend())", FASTLM_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"


def test_bad_environment_variable_is_a_clear_error():
    out = _in_subprocess("import torch, fastlm; fastlm.layer_norm(torch.randn(2, 4), 4)", FASTLM_BACKEND="fast")
    assert out.returncode != 0
    assert "FASTLM_BACKEND" in out.stderr


def test_import_touches_no_device_and_no_triton():
    code = ("import sys, torch, fastlm, fastlm.nn; "
            "assert 'triton' not in sys.modules, 'import fastlm imported triton'; "
            "assert not torch.cuda.is_initialized(), 'import fastlm initialised CUDA'; print('ok')")
    out = _in_subprocess(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cpu_default_runs_the_reference_without_warning():
    out = _in_subprocess(
        "import warnings, torch, fastlm; warnings.simplefilter('error'); "
        "x = torch.randn(3, 8); torch.testing.assert_close(fastlm.layer_norm(x, 8), "
        "torch.nn.functional.layer_norm(x, (8,))); print('ok')",
        TRITON_INTERPRET="0", FASTLM_BACKEND="")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error():
    out = _in_subprocess(
        "import torch, fastlm\n"
        "with fastlm.use_backend('triton'):\n"
        "    fastlm.rms_norm(torch.randn(3, 8), 8)\n",
        TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    assert out.returncode != 0
    assert "TRITON_INTERPRET" in out.stderr


# ----------------------------------------------------------------------------- the choice itself

def test_auto_on_cuda_falls_back_to_the_reference_once_with_a_warning(monkeypatch):
    monkeypatch.setattr(B, "unavailable_reason", lambda name, device: None)  # as on a GPU machine
    B._warned.clear()
    reasons = {"triton": "input has dtype torch.float64", "cuda": "not built"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = B.resolve("layer_norm", "cuda", reasons, requested="auto")
        second = B.resolve("layer_norm", "cuda", reasons, requested="auto")
    assert first == second == "torch"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "float64" in messages[0] and "layer_norm" in messages[0]


def test_auto_picks_triton_on_cuda_when_it_can(monkeypatch):
    monkeypatch.setattr(B, "unavailable_reason", lambda name, device: None)
    assert B.resolve("rms_norm", "cuda", {"triton": None, "cuda": "not built"}, requested="auto") == "triton"


def test_auto_on_cpu_is_the_reference():
    assert B.resolve("rms_norm", "cpu", {"triton": None, "cuda": None}, requested="auto") == "torch"


def test_explicit_backend_never_falls_back():
    with pytest.raises(fastlm.BackendUnavailableError, match="float64"):
        B.resolve("layer_norm", DEVICE.type, {"triton": "input has dtype torch.float64"}, requested="triton")
    assert B.resolve("layer_norm", DEVICE.type, {"triton": "anything"}, requested="torch") == "torch"


def test_auto_with_float64_on_this_device_gives_the_reference_answer():
    x = torch.randn(5, 16, dtype=torch.float64, device=DEVICE)
    with fastlm.use_backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = fastlm.rms_norm(x, 16)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (16,)))
