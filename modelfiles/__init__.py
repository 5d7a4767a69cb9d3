"""splitserve.modelfiles: where a model's configuration, tokenizer and (for a GGUF file) weights
are read from, a Hugging Face folder or a GGUF file alike (``read``: config, tokenizer, tokenizer
config, served name; ``gguf_file``, ``gguf_tokenizer``: the GGUF format).

Torch-free and below everything that reads a model: the engine (its config, tokenizer and
weights), the router (its tokenizer, chat template and context length) and the launcher, so the
router reads the model without importing the engine.
"""
