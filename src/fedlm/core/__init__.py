"""Shared types and leaf utilities of every layer: updates, tasks, the trainer-hook and runtime contracts, errors,
seeding, sampling and parameter validation. Imports nothing else of fedlm, so every package may use it."""
