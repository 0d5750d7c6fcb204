"""Training: task LoRAs, the retriever's embedder, LoRA-Flow and MeteoRA gates, a whole pool."""
