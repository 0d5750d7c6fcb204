"""The engine: base model, the batched composer over a pool's adapters, gates, generation, the scheduler.

Knows nothing of retrieval, serving, training or evaluation: a :class:`~loraretriever.engine.routing.Routing`
per row says which adapters to apply and how; where it came from is not the engine's business.
"""
