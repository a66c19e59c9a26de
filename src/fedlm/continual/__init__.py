"""Continual federated learning: slices of the data arriving over time, clients joining and leaving, the forgetting
measured after every stage, and two mitigations kept by each client (rehearsal, EWC on the adapter)."""
