//! Agent runs: the supervisor that turns a user message into streamed agent events.
