//! LLM providers: the built-in deterministic one and an OpenAI-compatible streaming client.
