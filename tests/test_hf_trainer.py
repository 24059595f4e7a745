"""transformers.Trainer on a patched model (issue 21, item 5): a tiny Llama trained for 20 steps
with fastlm's attention, norms, MLPs, rotary and fused lm-head loss (apply(..., fused_linear_loss
=True)) gives the same loss curve as the unpatched model from the same weights and data (CPU,
float32, nothing downloaded). The Trainer passes num_items_in_batch to the loss, which the
fused loss honours.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' Trainer needs it (a test extra; the GPU image may lack it)

from fastlm.integrations import transformers as ft  # noqa: E402

from .test_integrations_transformers import V, llama  # noqa: E402


class _Tokens(torch.utils.data.Dataset):
    """Fixed random token sequences with some right padding (labels -100 there)."""

    def __init__(self, n: int = 40, length: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, V, (n, length), generator=g)
        self.lengths = torch.randint(length // 2, length + 1, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        mask = (torch.arange(self.ids.shape[1]) < self.lengths[i]).long()
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.ids[i].masked_fill(mask == 0, -100)}


def _train(model, out_dir, steps: int = 20) -> list[float]:
    args = transformers.TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, max_steps=steps, learning_rate=2e-3,
                                          logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
                                          save_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_losses_match_the_unpatched_run(tmp_path):
    torch.manual_seed(0)
    base = llama()
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    unpatched = copy.deepcopy(base)
    patched = copy.deepcopy(base)
    handle = ft.apply(patched, fused_linear_loss=True)
    assert any("fused" in what for _, what in handle)
    want = _train(unpatched, tmp_path / "unpatched")
    got = _train(patched, tmp_path / "patched")
    assert len(want) == len(got) == 20
    assert want[-1] < want[0] * 0.9  # the run learns something: the comparison is not of two flat lines
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= 2e-3 * abs(b) + 1e-4 * (step + 1), (step, got, want)
    # and the patched model's weights moved as the unpatched one's
    for (name, p), q in zip(patched.named_parameters(), unpatched.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)
