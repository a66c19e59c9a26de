"""Per-round contribution scores of the clients (Shapley values of the round's updates against a server validation
set, no retraining) and the sampling that rewards them.

``utility.py`` prices a coalition (the validation loss of the aggregate of its updates); ``shapley.py`` (exact
enumeration), ``gtg.py`` (GTG-Shapley, Liu et al. 2022) and ``loo.py`` (leave-one-out) turn the prices into scores;
``observer.py`` scores every round after aggregation; ``sampling.py`` samples clients by their cumulative scores.
"""
