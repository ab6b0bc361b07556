//! The chat template of tokenizer_config.json, rendered with minijinja and HF semantics.
