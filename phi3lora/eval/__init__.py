"""Evaluation: lm-evaluation-harness's model type "phi3lora", and base vs adapter on a chat file."""
