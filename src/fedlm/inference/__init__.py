"""Using a trained run: the global model, a client's personal model, or both mixed; generate, chat, serve
(OpenAI-compatible). One base model in memory, adapters switched or stacked (:mod:`fedlm.inference.mix`)."""
