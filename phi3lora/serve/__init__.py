"""An OpenAI-compatible server: continuous batching, many LoRA adapters in one batch, a chat page."""
