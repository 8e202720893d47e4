"""Fake services (an OpenAI-compatible vLLM stand-in) shared by the tests."""
