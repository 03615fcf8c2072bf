"""The OpenAI-compatible HTTP server: transport over the runtime's guard and response shapes."""
