"""Training, evaluation and generation (the `fastlm train / eval / generate` commands): data,
tokenizers, objectives, the loop, checkpoints. docs/TRAINING.md describes them."""
