"""phi3-lora: a small, readable Phi-3 in plain PyTorch with LoRA fine-tuning and Triton kernels.

The design card's units are its subpackages: phi3mini (the model), lora (loralib's API and adapters), kernels
(Triton), plus data (the training data pipeline), training (the loop's parts), interp (looking inside) and cli
(the train/chat/probe programs). Nothing heavy is imported here.
"""
__version__ = "0.1.0"
