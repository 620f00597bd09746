"""L0: VM runtime contracts and adapters. Knows nothing of chains or HTTP."""
