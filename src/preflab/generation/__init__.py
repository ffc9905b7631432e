"""Sampling back ends under ``rollout``'s ``Generator`` interface: preflab's own decode loop
(``engine``, the default) and vLLM (``vllm``, optional). They return token ids; ``rollout``
builds ``Samples`` and chooses the back end (``rollout.make_generator``)."""
