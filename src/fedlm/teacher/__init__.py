"""Learning from a black-box teacher (``teacher``): any OpenAI-compatible endpoint labels the clients' prompts
(``mode: label``) or DP-synthesised prompts (``mode: synthetic``), and clients distil its answers into their update.

One job per module: :mod:`.client` (the HTTP calls: bounded concurrency, retries with backoff, timeout, validation),
:mod:`.cache` (answers on disk), :mod:`.audit` (what left each client), :mod:`.labeling` (answers to training
examples), :mod:`.kd` (the distillation objective), :mod:`.synthetic` (the DP-SGD prompt generator and the verbatim
filter), :mod:`.runtime` (the client-side wrapper that plugs it into a round).
"""
