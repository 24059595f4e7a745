"""Training, evaluation and generation: data, tokenizers, the loop, checkpoints (the `fastlm train/eval/generate` commands)."""
