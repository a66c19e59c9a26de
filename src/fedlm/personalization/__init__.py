"""Personalization: each client's own model beside the global one (finetune, FedSA-LoRA, FedDPA, Ditto, soft prompts)."""
