"""Update compression (``compression`` section): top-k sparsification with error feedback and stochastic block
quantization, as a wrapper around the clients' updates; what travels is the encoded message and its length is
what the traffic log counts."""
