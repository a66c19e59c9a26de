"""Offsite-tuning (Xiao et al. 2023, "Offsite-Tuning: Transfer Learning without Full Model") in the federation, with
FedBiOT's server-side emulator alignment (Wu et al. 2024, "FedBiOT: LLM Local Fine-tuning in Federated Learning
without Full Model").

The server keeps the full model. The clients receive an *emulator*: the bottom and top decoder layers as they are
(the adapters' home) around a middle compressed by uniform layer drop and distilled on the server's public text.
Every kept layer keeps its full-model index in its parameter names, so an adapter trained on the emulator has the
full model's parameter names and plugs into it as it is.

- :mod:`fedlm.offsite.layers`: which layers the emulator keeps (pure index math, checked at config load);
- :mod:`fedlm.offsite.emulator`: building the emulator from the full model, and its size;
- :mod:`fedlm.offsite.distill`: distilling the emulator's middle into the full model's on public text;
- :mod:`fedlm.offsite.plugin`: plugging an emulator-trained adapter into the full model (refusing a misfit);
- :mod:`fedlm.offsite.fedbiot`: the between-rounds alignment (a round observer);
- :mod:`fedlm.offsite.setup`: what a session builds and attaches.
"""
