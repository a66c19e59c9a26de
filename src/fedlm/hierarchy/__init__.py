"""Hierarchical federated learning: clients under edge aggregators, edges under the cloud (HierFAVG, Liu, Zhang,
Song & Letaief 2020). ``groups`` says which edge each client belongs to, ``edge`` is an edge's aggregation, ``round``
the cloud round built from the flat round's parts, ``setup`` the switch from the config."""
