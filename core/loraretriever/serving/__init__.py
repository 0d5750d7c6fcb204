"""Serving: :class:`~loraretriever.serving.routed_lm.RoutedLM`, the facade that routes and generates."""
