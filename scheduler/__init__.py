"""scheduler: the live DualMap routing service, its cluster config and the local vLLM launcher."""
