"""A stand-in ``vllm`` package for launcher tests: put tests/fakes/vllm_stub first on PYTHONPATH
of a child process and ``python -m vllm.entrypoints.openai.api_server`` starts the fake OpenAI
server (tests/fakes/openai_server.py) on the given --host/--port instead of a real engine."""
