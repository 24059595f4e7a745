"""The model benchmark suite's end-to-end CPU cases (issue 17): `fastlm train`'s tiny GPT,
training and greedy decoding tokens/s, fastlm against the plain-PyTorch twin with the same
weights (and Hugging Face's GPT-2 patched and unpatched where transformers imports)."""

import pytest
import torch

from fastlm.bench import model as model_bench
from fastlm.bench import runner

CEILINGS = {"copy_gbps": 10.0, "matmul_tflops": 0.05, "matmul_dtype": "fp32"}
TRAIN, DECODE = model_bench.TRAIN, model_bench.DECODE


def test_end_to_end_cases_use_the_fastlm_train_default_model():
    from fastlm.train.config import PRESETS
    from fastlm.train.tokenizer import ByteTokenizer

    preset = PRESETS["gpt"]["tiny"]
    assert model_bench.train_default_model() == (
        preset["model"]["n_layer"], preset["model"]["d_model"], preset["model"]["n_head"], ByteTokenizer().vocab_size,
        preset["train"]["seq_len"], preset["train"]["batch_size"])
    config = runner.Config(device=torch.device("cpu"), dtype=torch.float32)
    _, _, _, _, seq_len, batch = model_bench.train_default_model()
    assert model_bench.shapes(config) == [("gpt-tiny", model_bench.CPU_BATCH, model_bench.CPU_SEQLEN),
                                          (TRAIN, batch, seq_len),
                                          (DECODE, model_bench.DECODE_BATCH, model_bench.DECODE_NEW)]
    config.ops = [DECODE]
    assert model_bench.shapes(config) == [(DECODE, 1, 64)]


@pytest.fixture(scope="module")
def e2e_run():
    # Odd, tiny sizes: batch 3, 7 tokens a training window, 7 new tokens after the 16-token prompt.
    config = runner.Config(device=torch.device("cpu"), dtype=torch.float32, reps=2, warmup=1, rows=[3], widths=[7],
                           ops=[TRAIN, DECODE])
    harness = runner.Harness(config, CEILINGS)
    model_bench.run(config, harness)
    return config, harness


def test_train_and_decode_rows_for_every_implementation(e2e_run):
    config, harness = e2e_run
    impls = model_bench.implementations(config, runner.Harness(config, CEILINGS))
    assert {"fastlm-torch", runner.EAGER} <= set(impls)
    # Same weights: the losses after warm-up and the greedy tokens agree, nothing failed.
    assert not [n for n in harness.notes if "failed" in n or "differ" in n], harness.notes
    for op, mode in ((TRAIN, "train step"), (DECODE, "greedy decode")):
        rows = {r["impl"]: r for r in harness.rows if r["op"] == op}
        assert set(rows) == set(impls), (op, harness.notes)
        for impl, row in rows.items():
            assert row["mode"] == mode and (row["rows"], row["width"]) == (3, 7)
            assert row["ms"] > 0 and row["tokens_per_s"] > 0
            assert row["speedup_vs_eager"] == pytest.approx(rows[runner.EAGER]["ms"] / row["ms"])
        if op == DECODE:
            for row in rows.values():  # new tokens per second of whole generations
                assert row["tokens_per_s"] == pytest.approx(3 * 7 / (row["ms"] * 1e-3))
                assert row["prompt"] == model_bench.DECODE_PROMPT
        else:
            for row in rows.values():
                assert row["tokens_per_s"] == pytest.approx(3 * 7 / (row["ms"] * 1e-3))
        # The goal is reported, met or missed, for fastlm against the twin (and HF patched vs not).
        assert any(n.startswith(f"{op} ") and "fastlm-torch at " in n and "torch-eager's tokens/s" in n
                   for n in harness.notes), harness.notes
        if model_bench.HF_FASTLM in rows:
            assert any(f"{model_bench.HF_FASTLM} at " in n and n.startswith(f"{op} ") for n in harness.notes)


def test_plain_twin_decodes_with_its_cache_like_fastlm():
    from fastlm.models import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=67, max_seq_len=24, n_layer=2, n_head=3, d_model=48)).eval()
    plain = model_bench.PlainGPT(67, 24, 2, 48, 3)
    plain.load_state_dict(gpt.state_dict(), strict=True)
    prompt = torch.randint(0, 67, (3, 5))
    ours = gpt.generate(prompt, 11, temperature=0.0)
    theirs = plain.generate(prompt, 11)
    assert theirs.shape == (3, 16) and torch.equal(theirs[:, :5], prompt)
    assert torch.equal(ours, theirs)
    # The cache gives what a full forward without it gives: the last step's greedy token.
    with torch.no_grad():
        logits = gpt(theirs[:, :-1])["logits"][:, -1]
    assert torch.equal(logits.argmax(-1), theirs[:, -1])


def test_goal_notes():
    harness = runner.Harness(runner.Config(device=torch.device("cpu"), dtype=torch.float32), CEILINGS)
    rows = [{"impl": "fastlm-torch", "tokens_per_s": 96.0}, {"impl": runner.EAGER, "tokens_per_s": 100.0},
            {"impl": model_bench.HF, "tokens_per_s": 100.0}, {"impl": model_bench.HF_FASTLM, "tokens_per_s": 50.0}]
    model_bench._goal_notes(harness, "case", rows)
    assert harness.notes == ["case: fastlm-torch at 0.96x torch-eager's tokens/s (meets the 0.95x goal)",
                             "case: hf-gpt2-fastlm at 0.50x hf-gpt2's tokens/s (misses the 0.95x goal)"]
