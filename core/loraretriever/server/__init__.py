"""The OpenAI-compatible HTTP server over RoutedLM (FastAPI + uvicorn)."""
