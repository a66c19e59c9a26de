"""Model ownership: a server-side backdoor watermark of the global adapter and per-client marks for leak tracing
(WAFFLE, Tekgul et al. 2021). :mod:`triggers` derives the secret trigger sets, :mod:`embed` trains them into an
adapter, :mod:`verify` and :mod:`trace` test a suspect model, :mod:`rounds` plugs the marking into the round."""
