"""Retrieval: adapter cards, the embedder, the Chroma index and the router that turns prompts into routings.

Builds on the engine (adapter names, :class:`~loraretriever.engine.routing.Routing`); knows nothing of serving.
"""
