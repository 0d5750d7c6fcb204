"""The pool: LoRA adapters of one base model and the directory that stores them.

Adapter files (PEFT's format, read and checked: :mod:`~loraretriever.pool.adapter`), the registry
and its memory tiers (:mod:`~loraretriever.pool.lora_pool`), and the pool directory: its layout,
manifest, lock, intents, recovery and quarantine (:mod:`~loraretriever.pool.directory`). Below
the engine, which composes the adapters a pool holds; knows nothing of retrieval or serving.
"""
